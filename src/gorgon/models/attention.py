"""Batch-invariant paged attention.

Every query row attends to the keys at its logical positions 0..pos through a slot table (positions are
addresses into one preallocated KV store). The keys are visited in fixed blocks of `KV_BLOCK` logical
positions, aligned at 0, and combined with an online softmax in block order. A block's matmuls always have
the same shapes, keys past a row's position are masked to exact zeros, and fully masked blocks leave the
running state bitwise untouched. So a row's result depends only on its own context, never on how many rows,
sequences or blocks are computed with it: a decode row, a prefill row and a verification row at the same
position give the same bits. Arithmetic is float32 whatever the serving dtype and the cache's dtype (a bfloat16
cache is widened exactly as it is read).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gorgon.kernels.build import cpu_extension

KV_BLOCK = 256
# Query rows per sequence are padded to a multiple of this, so every score matmul runs with a row count the
# BLAS treats alike (measured: float32 GEMM rows are bitwise stable only for row counts that are multiples of 4).
QUERY_ROW_MULTIPLE = 4


@dataclass
class BlockedLayout:
    """The PyTorch path's view of a step: B sequences, each with Tq query rows (padded to
    QUERY_ROW_MULTIPLE).

      q_index     [B*Tq]  flat token row of each query row; padding points at row T (a zero row)
      kv_slots    [nb][B*KV_BLOCK]  per block, the slot of each logical position; padding slots are 0
      block_masks [nb][B, 1, rep*Tq, KV_BLOCK]  True where a key is hidden from a query row
    """

    num_seqs: int
    rows_per_seq: int
    q_index: torch.Tensor
    kv_slots: list[torch.Tensor]
    block_masks: list[torch.Tensor]


@dataclass
class AttentionMetadata:
    """What attention needs to know about a step, built once by the runner and shared by all layers.

      row_seq     [T]  sequence of each flat token row (-1: padding row)
      row_pos     [T]  logical position of each row
      slot_table  [B, C]  slot of each logical position of each sequence (C a multiple of KV_BLOCK)
      write_slots [T]  where each row's key/value is stored (slot 0 is a scratch slot)
      row_group   [T]  rows that see a common key prefix share an id (a sequence's rows and its candidate
                       tree's): the kernel reads those keys once for all of them (-1: padding row)
    Exactly one of `row_seq` (kernel path) or `blocked` (PyTorch path) is used by `paged_attention`.
    """

    row_seq: torch.Tensor
    row_pos: torch.Tensor
    slot_table: torch.Tensor
    write_slots: torch.Tensor
    row_group: torch.Tensor
    sliding_window: int | None
    use_kernel: bool
    blocked: BlockedLayout | None = None

    @classmethod
    def build(
        cls,
        seq_rows: list[list[int]],  # per sequence, its flat token rows
        seq_pos: list[list[int]],  # per sequence, the positions of those rows
        seq_slots: list[list[int]],  # per sequence, the slots of positions 0..end-1
        write_slots: list[int],  # per flat row (padding rows included)
        heads_per_kv: int,
        sliding_window: int | None,
        use_kernel: bool,
        device: torch.device,
        seq_group: list[int] | None = None,  # per sequence, the first sequence of its group (default: itself)
    ) -> AttentionMetadata:
        T = len(write_slots)
        ctx = _round_up(max(len(s) for s in seq_slots), KV_BLOCK)
        row_seq, row_pos, row_group = [-1] * T, [-1] * T, [-1] * T
        for b, (rows, pos) in enumerate(zip(seq_rows, seq_pos)):
            group = b if seq_group is None else seq_group[b]
            for r, p in zip(rows, pos):
                row_seq[r], row_pos[r], row_group[r] = b, p, group
        table = torch.tensor(
            [s + [SCRATCH_SLOT] * (ctx - len(s)) for s in seq_slots], dtype=torch.long, device=device
        )
        meta = cls(
            row_seq=torch.tensor(row_seq, dtype=torch.long, device=device),
            row_pos=torch.tensor(row_pos, dtype=torch.long, device=device),
            slot_table=table,
            write_slots=torch.tensor(write_slots, dtype=torch.long, device=device),
            row_group=torch.tensor(row_group, dtype=torch.long, device=device),
            sliding_window=sliding_window,
            use_kernel=use_kernel,
        )
        if not use_kernel:
            meta.blocked = _blocked_layout(seq_rows, seq_pos, table, T, heads_per_kv, sliding_window)
        return meta


SCRATCH_SLOT = 0


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _blocked_layout(seq_rows, seq_pos, table, total_rows, heads_per_kv, sliding_window) -> BlockedLayout:
    device = table.device
    tq = _round_up(max(len(r) for r in seq_rows), QUERY_ROW_MULTIPLE)
    q_index = torch.tensor(
        [r + [total_rows] * (tq - len(r)) for r in seq_rows], dtype=torch.long, device=device
    )
    q_pos = torch.tensor([p + [-1] * (tq - len(p)) for p in seq_pos], dtype=torch.long, device=device)
    B = len(seq_rows)
    pos = q_pos.repeat(1, heads_per_kv).view(B, 1, heads_per_kv * tq, 1)  # rows ordered (rep, Tq)
    offsets = torch.arange(KV_BLOCK, device=device).view(1, 1, 1, KV_BLOCK)
    masks, slots = [], []
    for j in range(table.shape[1] // KV_BLOCK):
        k_pos = offsets + j * KV_BLOCK
        hidden = k_pos > pos
        if sliding_window is not None:
            hidden = hidden | (k_pos <= pos - sliding_window)
        masks.append(hidden)
        slots.append(table[:, j * KV_BLOCK : (j + 1) * KV_BLOCK].reshape(-1))
    return BlockedLayout(B, tq, q_index.reshape(-1), slots, masks)


def paged_attention(
    q: torch.Tensor,  # [T, n_heads, d] float32 (rope applied)
    k_cache: torch.Tensor,  # [S, n_kv, d]
    v_cache: torch.Tensor,  # [S, n_kv, d]
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Returns [T, n_heads, d] float32."""
    _T, _n_heads, d = q.shape
    if meta.use_kernel:
        window = meta.sliding_window or 0
        return cpu_extension().paged_attention(
            q.float(),
            k_cache,
            v_cache,
            meta.row_seq,
            meta.row_pos,
            meta.slot_table,
            meta.row_group,
            window,
            d**-0.5,
        )
    return _blocked_attention(q, k_cache, v_cache, meta.blocked)


def kernel_available(kv_dtype: torch.dtype, device: torch.device) -> bool:
    return (
        device.type == "cpu" and kv_dtype in (torch.float32, torch.bfloat16) and cpu_extension() is not None
    )


def _blocked_attention(q, k_cache, v_cache, meta: BlockedLayout) -> torch.Tensor:
    """The PyTorch path: every sequence's rows against fixed blocks of keys, merged in block order."""
    T, n_heads, d = q.shape
    n_kv = k_cache.shape[1]
    rep = n_heads // n_kv
    B, Tq = meta.num_seqs, meta.rows_per_seq
    rows = rep * Tq

    # Gather each sequence's query rows; grouped-query heads fold into the row dimension.
    q_padded = torch.cat([q.float(), q.new_zeros(1, n_heads, d, dtype=torch.float32)])
    qb = q_padded.index_select(0, meta.q_index).mul_(d**-0.5)  # (B*Tq, nh, d)
    qb = qb.view(B, Tq, n_kv, rep, d).permute(0, 2, 3, 1, 4).reshape(B, n_kv, rows, d)

    m = denom = acc = None
    for slots, hidden in zip(meta.kv_slots, meta.block_masks):
        # Explicit contiguous copies: the matmuls then see one memory layout whatever B is.
        k = k_cache.index_select(0, slots).float().view(B, KV_BLOCK, n_kv, d).permute(0, 2, 3, 1).contiguous()
        v = v_cache.index_select(0, slots).float().view(B, KV_BLOCK, n_kv, d).transpose(1, 2).contiguous()
        scores = torch.matmul(qb, k).masked_fill_(hidden, float("-inf"))  # (B, n_kv, rows, BK)
        block_max = scores.amax(-1, keepdim=True)
        if m is None:
            # First block: the general update below with m = -inf, denom = acc = 0 reduces to exactly this
            # (0 * 0 + x == x), so skipping it changes no bit.
            m_safe = torch.where(block_max == float("-inf"), 0.0, block_max)
            p = torch.exp(scores - m_safe)
            m, denom, acc = block_max, p.sum(-1, keepdim=True), torch.matmul(p, v)
            continue
        m_new = torch.maximum(m, block_max)
        # Rows that have seen nothing yet keep m = -inf; use 0 there so exp() gives exact zeros, not NaN.
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        p = torch.exp(scores - m_safe)
        correction = torch.exp(m - m_safe)
        denom = denom * correction + p.sum(-1, keepdim=True)
        acc = acc * correction + torch.matmul(p, v)
        m = m_new
    out = acc / denom.clamp_min(torch.finfo(torch.float32).tiny)  # padding rows have denom 0
    out = out.view(B, n_kv, rep, Tq, d).permute(0, 3, 1, 2, 4).reshape(B * Tq, n_heads, d)

    result = out.new_zeros(T + 1, n_heads, d)
    result[meta.q_index] = out
    return result[:T]
