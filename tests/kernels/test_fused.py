"""Fused norm and rotary kernels against the PyTorch path they replace."""

import pytest
import torch

from gorgon.config import RopeConfig
from gorgon.kernels.build import cpu_extension
from gorgon.models.llama import RMSNorm
from gorgon.models.rope import RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.skipif(cpu_extension() is None, reason="CPU lacks AVX-512 kernels")


@pytest.mark.parametrize("hidden", [96, 100])  # whole vectors of 16, and a masked tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm(dtype, hidden):
    norm = RMSNorm(hidden, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = torch.randn(7, hidden).to(dtype), torch.randn(7, hidden).to(dtype)
    expected_residual = residual + x
    expected = norm(expected_residual)
    got = cpu_extension().add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(residual, expected_residual)  # updated in place, rounded as the model dtype rounds
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(got.float(), expected.float(), **tol)
    rows = [
        cpu_extension().add_rms_norm(None, expected_residual[i : i + 1].clone(), norm.weight, norm.eps)
        for i in range(7)
    ]
    assert torch.equal(
        torch.cat(rows), cpu_extension().add_rms_norm(None, expected_residual.clone(), norm.weight, norm.eps)
    )


@pytest.mark.parametrize("d", [16, 64])  # halves of 8 (scalar path) and of 32 (16 lanes at a time)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_store(dtype, d):
    nh, nkv, T = 4, 2, 5
    rotary = RotaryEmbedding(RopeConfig(theta=10000.0), d)
    cos, sin = rotary.cos_sin(torch.tensor([0, 3, 17, 100, 511]))
    qkv = torch.randn(T, (nh + 2 * nkv) * d).to(dtype)
    k_cache, v_cache = torch.zeros(20, nkv, d), torch.zeros(20, nkv, d)
    slots = torch.tensor([4, 9, 2, 11, 7])
    q = cpu_extension().rope_store(qkv, cos, sin, k_cache, v_cache, slots, nh, nkv, d)
    ref = apply_rotary(qkv[:, : (nh + nkv) * d].view(T, nh + nkv, d), cos, sin)
    torch.testing.assert_close(q, ref[:, :nh], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[slots], ref[:, nh:], atol=1e-5, rtol=1e-5)
    assert torch.equal(v_cache[slots], qkv[:, (nh + nkv) * d :].view(T, nkv, d).float())
    # A bfloat16 cache holds the same keys rounded to nearest even, and the values as they are.
    k16, v16 = torch.zeros(20, nkv, d, dtype=torch.bfloat16), torch.zeros(20, nkv, d, dtype=torch.bfloat16)
    q16 = cpu_extension().rope_store(qkv, cos, sin, k16, v16, slots, nh, nkv, d)
    assert torch.equal(q16, q)
    assert torch.equal(k16, k_cache.to(torch.bfloat16)) and torch.equal(v16, v_cache.to(torch.bfloat16))
    # Each row alone gets the bits it gets among the others.
    for t in range(T):
        alone = cpu_extension().rope_store(
            qkv[t : t + 1],
            cos[t : t + 1],
            sin[t : t + 1],
            k16.clone(),
            v16.clone(),
            slots[t : t + 1],
            nh,
            nkv,
            d,
        )
        assert torch.equal(alone, q[t : t + 1])


@pytest.mark.parametrize("intermediate", [64, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype, intermediate):
    gate_up = (torch.randn(6, 2 * intermediate) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])  # past the clamps, and zeros
    got = cpu_extension().silu_mul(gate_up)
    gate, up = gate_up.split(intermediate, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.float(), expected.float(), **tol)
    rows = [cpu_extension().silu_mul(gate_up[i : i + 1].clone()) for i in range(6)]
    assert torch.equal(torch.cat(rows), got)  # a row's bits never depend on the other rows
