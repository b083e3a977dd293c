"""Turns a `StepPlan` into tensors, runs the model once, and returns the logits the plan asked for."""

from __future__ import annotations

import torch

from gorgon.engine.kv_cache import SCRATCH_SLOT, KVCache
from gorgon.engine.scheduler import StepPlan
from gorgon.kernels.linear import InvariantLinear, row_multiple
from gorgon.models.attention import AttentionMetadata
from gorgon.models.attention import kernel_available as attention_kernel_available
from gorgon.models.llama import LlamaModel


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        cache: KVCache,
        dtype: torch.dtype,
        device: torch.device,
        batch_invariant: bool = True,
    ) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        # Without batch invariance (only to measure what it costs): plain BLAS, no row padding.
        self.rows = row_multiple(dtype, device) if batch_invariant else 1
        self.attention_kernel = batch_invariant and attention_kernel_available(cache.layers[0][0].dtype, device)
        for module in model.modules():
            if isinstance(module, InvariantLinear):
                module.use_kernel = batch_invariant

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> list[torch.Tensor]:
        """Returns, per chunk, float32 logits [rows, vocab]: every row or only the last, as the chunk asked."""
        ids, positions, write_slots, logit_rows = [], [], [], []
        q_index, q_pos, seq_slots = [], [], []
        row = 0
        for chunk in plan.chunks:
            n = len(chunk.tokens)
            ids += chunk.tokens
            positions += range(chunk.start, chunk.end)
            write_slots += chunk.seq.slots[chunk.start : chunk.end]
            q_index.append(list(range(row, row + n)))
            q_pos.append(list(range(chunk.start, chunk.end)))
            seq_slots.append(chunk.seq.slots[: chunk.end])
            logit_rows.append(list(range(row, row + n)) if chunk.want_all_logits else [row + n - 1])
            row += n

        total = _round_up(row, self.rows)
        pad = total - row
        meta = self._metadata(q_index, q_pos, seq_slots, write_slots + [SCRATCH_SLOT] * pad)
        dev = self.device
        input_ids = torch.tensor(ids + [0] * pad, dtype=torch.long, device=dev)
        pos = torch.tensor(positions + [0] * pad, dtype=torch.long, device=dev)
        hidden = self.model(input_ids, pos, self.cache.layers, meta)

        flat_rows = [r for rows in logit_rows for r in rows]
        n_logits = len(flat_rows)
        padded_rows = flat_rows + [0] * (_round_up(n_logits, self.rows) - n_logits)
        logits = self.model.logits(hidden[torch.tensor(padded_rows, device=dev)])[:n_logits]
        return list(logits.split([len(r) for r in logit_rows]))

    def _metadata(self, q_index, q_pos, seq_slots, write_slots) -> AttentionMetadata:
        cfg = self.model.config
        return AttentionMetadata.build(
            q_index,
            q_pos,
            seq_slots,
            write_slots,
            heads_per_kv=cfg.num_heads // cfg.num_kv_heads,
            sliding_window=cfg.sliding_window,
            use_kernel=self.attention_kernel,
            device=self.device,
        )
