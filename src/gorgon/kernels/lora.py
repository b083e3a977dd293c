"""Multi-LoRA for a flat batch: each row (token) may use its own adapter, or none.

After a base projection produced y [M, N_total] (possibly a fused output such as qkv, the target's columns
starting at `col_offset`), each row m with adapter i = row_adapter[m] gets its low-rank delta added in place:

    y[m, off : off + out_i] += scale_i * (A_i @ x[m]) @ Bt_i        (A_i [r_i, K], Bt_i = B_i^T [r_i, out_i])

Why this shape: a row's output must be bitwise independent of the batch it runs in (the property that keeps a
request's tokens the same whatever else is being served, and makes speculation exact). One pass per adapter over
the whole batch with masks, or a BLAS matmul over a gathered group, would round each row differently depending
on the row count. So the work is segmented by adapter (rows of one adapter share its weight reads) but each
row's arithmetic is fixed: on x86 CPUs with AVX-512 the kernel in cpu_lora.cpp computes every output element
with one instruction sequence; elsewhere a PyTorch fallback computes the delta in float64, whose errors are far
below the output's rounding, so its rows are practically invariant too.
"""

from __future__ import annotations

import torch

from gorgon.kernels.build import cpu_extension as _extension
from gorgon.kernels.linear import kernel_available

__all__ = ["kernel_available", "lora_apply", "lora_apply_reference"]


def lora_apply(
    x: torch.Tensor,
    y: torch.Tensor,
    row_adapter: torch.Tensor,
    a: list[torch.Tensor],
    b_t: list[torch.Tensor],
    scales: list[float],
    col_offset: int = 0,
    use_kernel: bool = True,
) -> None:
    """Adds each row's LoRA delta to y in place (see the module docstring).

    x [M, K]; y [M, N_total] of x's dtype; row_adapter [M] integer indices into a / b_t / scales, -1 for rows
    without LoRA; an empty a[i] (rank 0) leaves adapter i's rows untouched.
    """
    if use_kernel and kernel_available(x.dtype, x.device):
        _extension().lora_apply(
            x, y, row_adapter.long(), list(a), list(b_t), [float(s) for s in scales], int(col_offset)
        )
        return
    _check(x, y, row_adapter, a, b_t, scales, col_offset)
    for i in torch.unique(row_adapter).tolist():
        if i < 0 or a[i].numel() == 0:
            continue
        rows = (row_adapter == i).nonzero().squeeze(1)
        out = b_t[i].shape[1]
        h = x[rows].double() @ a[i].double().T * float(scales[i])
        target = y[rows, col_offset : col_offset + out]
        y[rows, col_offset : col_offset + out] = (target.double() + h @ b_t[i].double()).to(y.dtype)


def lora_apply_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    row_adapter: torch.Tensor,
    a: list[torch.Tensor],
    b_t: list[torch.Tensor],
    scales: list[float],
    col_offset: int = 0,
) -> torch.Tensor:
    """The definition, row by row in float64, for tests: returns a new tensor, y is not modified."""
    result = y.clone()
    for m in range(x.shape[0]):
        i = int(row_adapter[m])
        if i < 0 or a[i].numel() == 0:
            continue
        h = (a[i].double() @ x[m].double()) * float(scales[i])
        delta = h @ b_t[i].double()
        cols = slice(col_offset, col_offset + delta.shape[0])
        result[m, cols] = (y[m, cols].double() + delta).to(y.dtype)
    return result


def _check(x, y, row_adapter, a, b_t, scales, col_offset) -> None:
    """The fallback's argument checks (the kernel makes the same ones in C++)."""
    if x.dim() != 2 or y.dim() != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"lora_apply: x [M, K] and y [M, N] expected, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if y.dtype != x.dtype:
        raise ValueError(f"lora_apply: y's dtype {y.dtype} is not x's {x.dtype}")
    if row_adapter.shape != (x.shape[0],):
        raise ValueError(f"lora_apply: row_adapter must be [{x.shape[0]}], got {tuple(row_adapter.shape)}")
    if not len(a) == len(b_t) == len(scales):
        raise ValueError(
            f"lora_apply: a, b_t and scales differ in length ({len(a)}, {len(b_t)}, {len(scales)})"
        )
    if col_offset < 0:
        raise ValueError(f"lora_apply: col_offset must be >= 0, got {col_offset}")
    for i, (ai, bi) in enumerate(zip(a, b_t)):
        if ai.numel() == 0:
            continue
        if ai.dim() != 2 or ai.shape[1] != x.shape[1] or bi.dim() != 2 or bi.shape[0] != ai.shape[0]:
            raise ValueError(
                f"lora_apply: adapter {i}: a [r, {x.shape[1]}] and b_t [r, out] expected, "
                f"got {tuple(ai.shape)} and {tuple(bi.shape)}"
            )
        if ai.dtype != x.dtype or bi.dtype != x.dtype:
            raise ValueError(f"lora_apply: adapter {i}: a and b_t must have x's dtype {x.dtype}")
        if col_offset + bi.shape[1] > y.shape[1]:
            raise ValueError(
                f"lora_apply: adapter {i}: col_offset + out = {col_offset} + {bi.shape[1]} "
                f"exceeds y's {y.shape[1]} columns"
            )
    if row_adapter.numel() and not -1 <= int(row_adapter.min()) <= int(row_adapter.max()) < len(a):
        raise ValueError(f"lora_apply: adapter indices must lie in [-1, {len(a)})")
