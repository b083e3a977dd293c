"""The LoRA adapters of one step: which adapter each flat token row uses, and the deltas they add.

A step mixes rows of requests with different LoRA adapters and with none. Every projection runs once for the
whole batch on the base weights; then, per LoRA target, one segmented low-rank call adds each row's own
adapter delta in place (`gorgon.kernels.lora.lora_apply`): never one forward pass per adapter. The per-row
arithmetic does not depend on the other rows, so LoRA requests keep the batch invariance of the base path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gorgon.kernels.lora import lora_apply


@dataclass
class LoraBatch:
    """adapters: the distinct LoRA adapters of the step (`gorgon.adapters.lora.LoraAdapter`);
    rows: [T] index into `adapters` of each flat token row, -1 for rows without LoRA (and padding);
    head_rows: the same for the rows of the step's lm_head call (sampled rows, then Medusa head rows)."""

    adapters: list[Any]
    rows: torch.Tensor
    head_rows: torch.Tensor | None = None
    use_kernel: bool = True

    @classmethod
    def build(
        cls, row_adapters: list[Any], device: torch.device, use_kernel: bool = True
    ) -> LoraBatch | None:
        """From the adapter (or None) of each flat row; None when no row has a LoRA."""
        adapters: list[Any] = []
        index: dict[int, int] = {}
        rows = []
        for adapter in row_adapters:
            if adapter is None:
                rows.append(-1)
                continue
            if id(adapter) not in index:
                index[id(adapter)] = len(adapters)
                adapters.append(adapter)
            rows.append(index[id(adapter)])
        if not adapters:
            return None
        return cls(adapters, torch.tensor(rows, dtype=torch.long, device=device), use_kernel=use_kernel)

    def set_head_rows(self, row_adapters: list[Any]) -> None:
        index = {id(a): i for i, a in enumerate(self.adapters)}
        rows = [-1 if a is None else index[id(a)] for a in row_adapters]
        self.head_rows = torch.tensor(rows, dtype=torch.long, device=self.rows.device)

    def apply(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor, col_offset: int = 0) -> None:
        """y[:, col_offset:] += each row's LoRA delta of `target` (y = the base projection of x, possibly a
        fused one whose columns for `target` start at col_offset), in place."""
        weights = [adapter.layers[layer].get(target) for adapter in self.adapters]
        if any(w is not None for w in weights):
            self._call(x, y, self.rows, weights, col_offset)

    def apply_lm_head(self, x: torch.Tensor, y: torch.Tensor) -> None:
        weights = [adapter.lm_head for adapter in self.adapters]
        if self.head_rows is not None and any(w is not None for w in weights):
            self._call(x, y, self.head_rows, weights, 0)

    def _call(self, x, y, rows, weights, col_offset: int) -> None:
        # An adapter without this target takes part with rank 0: its rows stay as the base computed them.
        none = x.new_empty(0, x.shape[1]), x.new_empty(0, 0)
        a = [none[0] if w is None else w.a for w in weights]
        b_t = [none[1] if w is None else w.b_t for w in weights]
        scales = [0.0 if w is None else w.scale for w in weights]
        lora_apply(x, y, rows[: x.shape[0]], a, b_t, scales, col_offset, use_kernel=self.use_kernel)
