"""Batch-invariant paged attention.

Every query row attends to the keys at its logical positions 0..pos through a slot table (positions are
addresses into one preallocated KV store). The keys are visited in fixed blocks of `KV_BLOCK` logical
positions, aligned at 0, and combined with an online softmax in block order. A block's matmuls always have
the same shapes, keys past a row's position are masked to exact zeros, and fully masked blocks leave the
running state bitwise untouched. So a row's result depends only on its own context, never on how many rows,
sequences or blocks are computed with it: a decode row, a prefill row and a verification row at the same
position give the same bits. Arithmetic is float32 whatever the serving dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_BLOCK = 256
# Query rows per sequence are padded to a multiple of this, so every score matmul runs with a row count the
# BLAS treats alike (measured: float32 GEMM rows are bitwise stable only for row counts that are multiples of 4).
QUERY_ROW_MULTIPLE = 4


@dataclass
class AttentionMetadata:
    """Tensors the runner builds once per step; shared by all layers.

    B sequences, each with Tq (padded) query rows:
      q_index  [B, Tq]  flat token row of each query row; padding points at row T (a zero row)
      q_pos    [B, Tq]  logical position of each query row; padding is -1 (sees nothing)
      kv_slots [B, nb*KV_BLOCK]  slot of each logical position; padding slots are 0 (masked)
      write_slots [T]   where each flat row's key/value is stored (slot 0 is a scratch slot)
    """

    q_index: torch.Tensor
    q_pos: torch.Tensor
    kv_slots: torch.Tensor
    write_slots: torch.Tensor
    sliding_window: int | None = None

    @property
    def num_blocks(self) -> int:
        return self.kv_slots.shape[1] // KV_BLOCK


def paged_attention(
    q: torch.Tensor,  # [T, n_heads, d] (rope applied)
    k_cache: torch.Tensor,  # [S, n_kv, d]
    v_cache: torch.Tensor,  # [S, n_kv, d]
    meta: AttentionMetadata,
) -> torch.Tensor:
    T, n_heads, d = q.shape
    n_kv = k_cache.shape[1]
    rep = n_heads // n_kv
    B, Tq = meta.q_index.shape
    scale = d**-0.5

    # Gather each sequence's query rows; grouped-query heads fold into the row dimension.
    q_padded = torch.cat([q, q.new_zeros(1, n_heads, d)])
    qb = q_padded[meta.q_index].float() * scale  # (B, Tq, nh, d)
    qb = qb.view(B, Tq, n_kv, rep, d).permute(0, 2, 3, 1, 4).reshape(B, n_kv, rep * Tq, d)
    q_pos = meta.q_pos.repeat(1, rep).view(B, 1, rep * Tq, 1)

    m = torch.full((B, n_kv, rep * Tq, 1), float("-inf"), device=q.device)
    denom = torch.zeros((B, n_kv, rep * Tq, 1), device=q.device)
    acc = torch.zeros((B, n_kv, rep * Tq, d), device=q.device)
    offsets = torch.arange(KV_BLOCK, device=q.device).view(1, 1, 1, KV_BLOCK)
    for j in range(meta.num_blocks):
        slots = meta.kv_slots[:, j * KV_BLOCK : (j + 1) * KV_BLOCK]
        k = k_cache[slots].float().permute(0, 2, 3, 1)  # (B, n_kv, d, BK)
        v = v_cache[slots].float().transpose(1, 2)  # (B, n_kv, BK, d)
        scores = qb @ k  # (B, n_kv, rep*Tq, BK)
        k_pos = offsets + j * KV_BLOCK
        hidden = k_pos > q_pos
        if meta.sliding_window is not None:
            hidden = hidden | (k_pos <= q_pos - meta.sliding_window)
        scores = scores.masked_fill(hidden, float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
        # Rows that have seen nothing yet keep m = -inf; use 0 there so exp() gives exact zeros, not NaN.
        m_safe = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
        p = torch.exp(scores - m_safe)
        correction = torch.exp(m - m_safe)
        denom = denom * correction + p.sum(-1, keepdim=True)
        acc = acc * correction + p @ v
        m = m_new
    out = acc / denom.clamp_min(torch.finfo(torch.float32).tiny)  # padding rows have denom 0
    out = out.view(B, n_kv, rep, Tq, d).permute(0, 3, 1, 2, 4).reshape(B * Tq, n_heads, d)

    result = q.new_zeros(T + 1, n_heads, d)
    result[meta.q_index.reshape(-1)] = out.to(q.dtype)
    return result[:T]
