"""Turns a `StepPlan` into tensors, runs the model once, and returns the logits the plan asked for."""

from __future__ import annotations

import torch

from gorgon.engine.kv_cache import SCRATCH_SLOT, KVCache
from gorgon.engine.scheduler import StepPlan
from gorgon.kernels.linear import row_multiple
from gorgon.models.attention import KV_BLOCK, QUERY_ROW_MULTIPLE, AttentionMetadata
from gorgon.models.llama import LlamaModel


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache, dtype: torch.dtype, device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.device = device
        self.rows = row_multiple(dtype, device)

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
        meta = self._metadata(q_index, q_pos, seq_slots, write_slots + [SCRATCH_SLOT] * pad, total)
        dev = self.device
        input_ids = torch.tensor(ids + [0] * pad, dtype=torch.long, device=dev)
        pos = torch.tensor(positions + [0] * pad, dtype=torch.long, device=dev)
        hidden = self.model(input_ids, pos, self.cache.layers, meta)

        flat_rows = [r for rows in logit_rows for r in rows]
        n_logits = len(flat_rows)
        padded_rows = flat_rows + [0] * (_round_up(n_logits, self.rows) - n_logits)
        logits = self.model.logits(hidden[torch.tensor(padded_rows, device=dev)])[:n_logits]
        return list(logits.split([len(r) for r in logit_rows]))

    def _metadata(self, q_index, q_pos, seq_slots, write_slots, total_rows) -> AttentionMetadata:
        tq = _round_up(max(len(r) for r in q_index), QUERY_ROW_MULTIPLE)
        ctx = _round_up(max(len(s) for s in seq_slots), KV_BLOCK)
        dev = self.device
        pad_row = total_rows  # attention's zero row
        qi = torch.tensor([r + [pad_row] * (tq - len(r)) for r in q_index], dtype=torch.long, device=dev)
        qp = torch.tensor([p + [-1] * (tq - len(p)) for p in q_pos], dtype=torch.long, device=dev)
        kv = torch.tensor([s + [SCRATCH_SLOT] * (ctx - len(s)) for s in seq_slots], dtype=torch.long, device=dev)
        cfg = self.model.config
        return AttentionMetadata.build(
            qi,
            qp,
            kv,
            torch.tensor(write_slots, dtype=torch.long, device=dev),
            heads_per_kv=cfg.num_heads // cfg.num_kv_heads,
            sliding_window=cfg.sliding_window,
        )
