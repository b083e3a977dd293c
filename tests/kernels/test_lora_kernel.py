"""Multi-LoRA apply: right values, and each row's bits independent of its batch, its adapters and the threads."""

from contextlib import contextmanager

import pytest
import torch

from gorgon.kernels import build
from gorgon.kernels import lora as kl

DTYPES = [torch.float32, torch.bfloat16]
RANKS = [1, 8, 0, 16, 64]  # the 0: an adapter without LoRA on this target
# (K, out, col_offset, N_total): K and out off the 16/32 grid, a target inside a wider fused output...
SHAPES = [(100, 72, 37, 200), (576, 576, 0, 576), (7, 5, 3, 9), (64, 192, 576, 768)]


def _needs_kernel():
    if build.cpu_extension() is None:
        pytest.skip("CPU kernels unavailable (no AVX512-BF16 or no compiler)")


@contextmanager
def _threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _adapters(dtype, k, out, ranks, seed=0):
    """LoRA-like weights (A ~ 1/sqrt(K), small B): deltas of order one, like real adapters."""
    g = torch.Generator().manual_seed(seed)
    a, b_t, scales = [], [], []
    for i, r in enumerate(ranks):
        n = out - 8 * (i % 2) if out > 16 else out  # adapters may differ in out, too
        a.append((torch.randn(r, k, generator=g) / k**0.5).to(dtype))
        b_t.append((torch.randn(r, n, generator=g) / max(r, 1) ** 0.5).to(dtype))
        scales.append(0.5 + i)
    return a, b_t, scales


def _scenario(dtype, k=100, out=72, col_offset=37, n_total=200, ranks=RANKS, m=37, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    a, b_t, scales = _adapters(dtype, k, out, ranks, seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    y = torch.randn(m, n_total, generator=g).to(dtype)
    row_adapter = torch.randint(-1, len(ranks), (m,), generator=g)
    row_adapter[: len(ranks) + 1] = torch.arange(-1, len(ranks))  # every adapter (and no LoRA) present
    return x, y, row_adapter, a, b_t, scales, col_offset


def _apply(x, y, row_adapter, a, b_t, scales, col_offset, use_kernel=True):
    y = y.clone()
    kl.lora_apply(x, y, row_adapter, a, b_t, scales, col_offset, use_kernel=use_kernel)
    return y


def _assert_close(got, ref):
    """float32: 1e-5 relative; bfloat16: at most one bf16 ulp from the float64 result rounded to bf16."""
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        return
    g, r = got.double(), ref.double()
    _, exp = torch.frexp(torch.maximum(g.abs(), r.abs()))
    ulp = torch.ldexp(torch.ones_like(g), exp - 8)  # 8 significant bits
    bad = (g - r).abs() > ulp + 1e-6
    assert not bad.any(), (
        f"{int(bad.sum())} values off by more than one ulp, e.g. {g[bad][:4]} vs {r[bad][:4]}"
    )


def _assert_untouched(got, y, row_adapter, a, b_t, col_offset):
    """Rows without LoRA, rank-0 adapters and columns outside each row's target keep their exact bits."""
    for m, i in enumerate(row_adapter.tolist()):
        if i < 0 or a[i].numel() == 0:
            assert torch.equal(got[m], y[m])
        else:
            end = col_offset + b_t[i].shape[1]
            assert torch.equal(got[m, :col_offset], y[m, :col_offset])
            assert torch.equal(got[m, end:], y[m, end:])


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_values_match_reference(dtype, shape, use_kernel):
    if use_kernel:
        _needs_kernel()
    k, out, col_offset, n_total = shape
    args = _scenario(dtype, k, out, col_offset, n_total)
    got = _apply(*args, use_kernel=use_kernel)
    _assert_close(got, kl.lora_apply_reference(*args))
    _, y, row_adapter, a, b_t, _, _ = args
    _assert_untouched(got, y, row_adapter, a, b_t, col_offset)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_256(dtype):
    _needs_kernel()
    args = _scenario(dtype, k=576, out=576, col_offset=0, n_total=576, ranks=[256, 3], m=9)
    _assert_close(_apply(*args), kl.lora_apply_reference(*args))


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_bits_independent_of_batch_and_threads(dtype, use_kernel):
    """Each row alone (M=1) equals the same row inside any mixed batch, in any order, with 1 or 2 threads."""
    if use_kernel:
        _needs_kernel()
    x, y, row_adapter, a, b_t, scales, off = _scenario(dtype)
    rest = (a, b_t, scales, off)
    alone = [
        _apply(x[m : m + 1], y[m : m + 1], row_adapter[m : m + 1], *rest, use_kernel)[0] for m in range(37)
    ]
    g = torch.Generator().manual_seed(7)
    for threads in (1, 2):
        with _threads(threads):
            for size in (1, 2, 3, 4, 5, 8, 13, 37):
                rows = torch.randperm(37, generator=g)[:size]
                got = _apply(x[rows], y[rows], row_adapter[rows], *rest, use_kernel)
                for pos, m in enumerate(rows.tolist()):
                    assert torch.equal(got[pos], alone[m]), (
                        f"row {m} differs in a batch of {size} ({threads} thr)"
                    )


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_same_rows_other_adapters(dtype, use_kernel):
    """A row's bits do not depend on which adapters its neighbours use (re-assigning them changes nothing)."""
    if use_kernel:
        _needs_kernel()
    x, y, row_adapter, a, b_t, scales, off = _scenario(dtype)
    base = _apply(x, y, row_adapter, a, b_t, scales, off, use_kernel)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        other = row_adapter.clone()
        other[1::2] = torch.randint(
            -1, len(a), (len(other[1::2]),), generator=g
        )  # rows 0, 2, 4... keep theirs
        got = _apply(x, y, other, a, b_t, scales, off, use_kernel)
        assert torch.equal(got[0::2], base[0::2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_wide_output_like_lm_head(dtype):
    """out = 49152 (an lm_head LoRA): columns are split over threads, results right and thread-independent."""
    _needs_kernel()
    args = _scenario(dtype, k=576, out=49152, col_offset=0, n_total=49152, ranks=[16], m=3)
    x, y, _, a, b_t, scales, off = args
    row_adapter = torch.zeros(3, dtype=torch.long)
    args = (x, y, row_adapter, a, b_t, scales, off)
    with _threads(1):
        one = _apply(*args)
    with _threads(2):
        two = _apply(*args)
    assert torch.equal(one, two)
    _assert_close(two, kl.lora_apply_reference(*args))


def test_strided_rows_of_y():
    """y may be a row-strided view (a slice of a bigger buffer); only its own elements change."""
    _needs_kernel()
    x, y, row_adapter, a, b_t, scales, off = _scenario(torch.bfloat16)
    buf = torch.randn(37, 260).to(torch.bfloat16)
    buf[:, 30:230] = y
    view, before = buf[:, 30:230], buf.clone()
    kl.lora_apply(x, view, row_adapter, a, b_t, scales, off)
    assert torch.equal(view, _apply(x, y, row_adapter, a, b_t, scales, off))
    assert torch.equal(buf[:, :30], before[:, :30]) and torch.equal(buf[:, 230:], before[:, 230:])


@pytest.mark.parametrize("use_kernel", [True, False])
def test_bad_arguments_raise(use_kernel):
    if use_kernel:
        _needs_kernel()
    x, y, row_adapter, a, b_t, scales, off = _scenario(torch.float32, m=8)

    def call(**kw):
        args = {"x": x, "y": y.clone(), "row_adapter": row_adapter, "a": a, "b_t": b_t, "scales": scales}
        args = {"col_offset": off, **args, **kw}
        with pytest.raises((RuntimeError, ValueError)):
            kl.lora_apply(**args, use_kernel=use_kernel)

    call(a=[a[0].to(torch.bfloat16)] + a[1:])  # an adapter's dtype is not x's
    call(y=y.to(torch.bfloat16))  # y's dtype is not x's
    call(row_adapter=torch.full((8,), len(a), dtype=torch.long))  # index past the list
    call(row_adapter=torch.full((8,), -2, dtype=torch.long))  # below -1
    call(col_offset=y.shape[1] - 10)  # col_offset + out > N_total
    call(a=[a[0][:, :-1]] + a[1:])  # A's K is not x's
    call(b_t=[b_t[0][:0]] + b_t[1:])  # B's rank is not A's
    call(scales=scales[:-1])  # lists of different lengths


@pytest.mark.parametrize("use_kernel", [True, False])
def test_bf16_rounding_is_torchs(use_kernel):
    """Ties round to even and bf16 subnormals survive (c10::BFloat16 rounding, no flush to zero)."""
    if use_kernel:
        _needs_kernel()
    bf = torch.bfloat16
    y = torch.tensor([[1.0], [1.0078125], [0.0], [-3.0], [2.0**-133]], dtype=bf)
    b_t = torch.tensor([[2.0**-8]], dtype=bf)  # one-rank adapter: delta = x * 2^-8
    x = torch.tensor([[1.0], [1.0], [2.0**-122], [1.0], [0.0]], dtype=bf)
    args = (x, y, torch.zeros(5, dtype=torch.long), [torch.ones(1, 1, dtype=bf)], [b_t], [1.0], 0)
    got = _apply(*args, use_kernel=use_kernel)
    assert torch.equal(got, kl.lora_apply_reference(*args))
    assert got[:, 0].tolist() == [1.0, 1.015625, 2.0**-130, -3.0, 2.0**-133]
