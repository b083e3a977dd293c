"""The invariant linear: right values, and each row's bits independent of the row count."""

import pytest
import torch
import torch.nn.functional as F

from gorgon.kernels import linear as kl

needs_kernel = pytest.mark.skipif(
    not kl.kernel_available(torch.float32, torch.device("cpu")), reason="CPU lacks AVX512-BF16 kernels"
)

SHAPES = [(576, 576), (1536, 576), (576, 1536), (8, 64), (13, 33), (7, 100), (49152, 64)]


def _layer(n, k, dtype, bias):
    torch.manual_seed(n * 1000 + k)
    layer = kl.InvariantLinear(k, n, bias=bias).to(dtype).requires_grad_(False)
    with torch.no_grad():
        layer.weight.normal_()
        if bias:
            layer.bias.normal_()
    return layer


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
def test_kernel_values_and_row_invariance(dtype, n, k):
    layer = _layer(n, k, dtype, bias=n % 2 == 1)
    x = torch.randn(37, k).to(dtype)
    with torch.inference_mode():
        rows = [layer(x[i : i + 1])[0] for i in range(37)]
        for m in (1, 2, 3, 4, 5, 8, 16, 37):
            y = layer(x[:m])
            for i in range(m):
                assert torch.equal(y[i], rows[i]), f"row {i} differs when computed with {m} rows"
        y = layer(x)
    ref = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    # bf16 output rounding: half an ulp of the result's magnitude.
    tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.5, "rtol": 1e-2}
    torch.testing.assert_close(y.float(), ref, **tol)


@needs_kernel
def test_repacks_when_weights_change():
    layer = _layer(16, 32, torch.float32, bias=False)
    x = torch.randn(2, 32)
    with torch.inference_mode():
        before = layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)
    with torch.inference_mode():
        after = layer(x)
    torch.testing.assert_close(after, before * 2)


def test_autograd_path_is_plain_linear():
    layer = _layer(8, 16, torch.float32, bias=True).requires_grad_(True)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blas_fallback_is_row_stable_at_its_padding(monkeypatch, dtype):
    """Without the kernel, padding row counts to `row_multiple` keeps rows stable (the measured BLAS rule)."""
    monkeypatch.setattr(kl, "kernel_available", lambda *a: False)
    mult = kl.row_multiple(dtype, torch.device("cpu"))
    layer = _layer(1536, 576, dtype, bias=False)
    x = torch.randn(64, 576).to(dtype)

    def padded(rows):
        m = rows.shape[0]
        total = (m + mult - 1) // mult * mult
        return layer(torch.cat([rows, rows.new_zeros(total - m, 576)]))[:m]

    with torch.inference_mode():
        ref = [padded(x[i : i + 1])[0] for i in range(64)]
        for m in (1, 2, 3, 5, 8, 13, 64):
            y = padded(x[:m])
            assert all(torch.equal(y[i], ref[i]) for i in range(m))


def test_frozen_layer_still_passes_gradients_to_its_input():
    layer = _layer(8, 16, torch.float32, bias=False)  # frozen (requires_grad False), like a served lm_head
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
