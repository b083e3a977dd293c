"""The LoRA adapters of one step: which adapter each flat token row uses, and the deltas they add.

A step mixes rows of requests with different LoRA adapters and with none. Every projection runs once for the
whole batch on the base weights; then, per LoRA target, one segmented low-rank call adds each row's own
adapter delta in place (`gorgon.kernels.lora`): never one forward pass per adapter. The per-row arithmetic
does not depend on the other rows, so LoRA requests keep the batch invariance of the base path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gorgon.kernels.build import cpu_extension
from gorgon.kernels.lora import kernel_available, lora_apply

# Per (layer, target): the kernel's argument lists (A, B^T, scale per adapter of the step), or None when no
# adapter of the step has that target.
_Args = tuple[list[torch.Tensor], list[torch.Tensor], list[float]] | None


@dataclass
class LoraBatch:
    """adapters: the distinct LoRA adapters of the step (`gorgon.adapters.lora.LoraAdapter`);
    rows: [T] index into `adapters` of each flat token row, -1 for rows without LoRA (and padding);
    head_rows: the same for the rows of the step's lm_head call (sampled rows, then Medusa head rows)."""

    adapters: list[Any]
    rows: torch.Tensor
    head_rows: torch.Tensor | None = None
    kernel: Any = None  # the compiled extension when its LoRA kernel serves this dtype and device
    # Argument lists, built on first use; decode steps with the same adapters share them (`reuse`), so a
    # steady batch pays for them once.
    args: dict[tuple[int, str], _Args] = field(default_factory=dict)

    @classmethod
    def build(
        cls, row_adapters: list[Any], dtype: torch.dtype, device: torch.device, use_kernel: bool = True
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
        kernel = cpu_extension() if use_kernel and kernel_available(dtype, device) else None
        return cls(adapters, torch.tensor(rows, dtype=torch.long, device=device), kernel=kernel)

    def reuse(self, previous: LoraBatch | None) -> None:
        """Share the argument lists of the previous step when it had the very same adapters, in order."""
        same = previous is not None and len(previous.adapters) == len(self.adapters)
        if same and all(p is q for p, q in zip(previous.adapters, self.adapters)):
            self.args = previous.args

    def set_head_rows(self, row_adapters: list[Any]) -> None:
        index = {id(a): i for i, a in enumerate(self.adapters)}
        rows = [-1 if a is None else index[id(a)] for a in row_adapters]
        self.head_rows = torch.tensor(rows, dtype=torch.long, device=self.rows.device)

    def apply(self, layer: int, target: str, x: torch.Tensor, y: torch.Tensor, col_offset: int = 0) -> None:
        """y[:, col_offset:] += each row's LoRA delta of `target` (y = the base projection of x, possibly a
        fused one whose columns for `target` start at col_offset), in place."""
        key = (layer, target)
        if key not in self.args:
            self.args[key] = _arguments([a.layers[layer].get(target) for a in self.adapters], x)
        if (args := self.args[key]) is not None:
            self._run(x, y, self.rows, args, col_offset)

    def apply_lm_head(self, x: torch.Tensor, y: torch.Tensor) -> None:
        key = (-1, "lm_head")
        if key not in self.args:
            self.args[key] = _arguments([a.lm_head for a in self.adapters], x)
        if (args := self.args[key]) is not None and self.head_rows is not None:
            self._run(x, y, self.head_rows, args, 0)

    def _run(self, x, y, rows, args, col_offset: int) -> None:
        if self.kernel is not None:
            self.kernel.lora_apply(x, y, rows, *args, col_offset)
        else:
            lora_apply(x, y, rows, *args, col_offset, use_kernel=False)


def _arguments(weights: list[Any], x: torch.Tensor) -> _Args:
    if all(w is None for w in weights):
        return None
    # An adapter without this target takes part with rank 0: its rows stay as the base computed them.
    no_a, no_b = x.new_empty(0, x.shape[1]), x.new_empty(0, 0)
    a = [no_a if w is None else w.a for w in weights]
    b_t = [no_b if w is None else w.b_t for w in weights]
    scales = [0.0 if w is None else float(w.scale) for w in weights]
    return a, b_t, scales
