"""MedusaHeads against the math written out by hand: v1/v2 logits, zero init, format names, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from adapter_files import H, V, reference_tensors

from gorgon.adapters.medusa import MedusaConfig, MedusaHeads, check_per_request
from gorgon.kernels.linear import InvariantLinear, kernel_available


def config(version: int = 2, num_heads: int = 3, num_layers: int = 1, **kw) -> MedusaConfig:
    return MedusaConfig(
        num_heads=num_heads, num_layers=num_layers, version=version, hidden_size=H, vocab_size=V, **kw
    )


def heads_with(sd: dict, cfg: MedusaConfig) -> MedusaHeads:
    heads = MedusaHeads(cfg)
    heads.load_medusa_format(sd)
    return heads.eval()


def lm_head(seed: int = 1) -> InvariantLinear:
    torch.manual_seed(seed)
    head = InvariantLinear(H, V, bias=False)
    head.weight.requires_grad_(False)
    return head


def by_hand(sd: dict, x: torch.Tensor, k: int, num_layers: int) -> torch.Tensor:
    h = x
    for j in range(num_layers):
        h = h + F.silu(h @ sd[f"{k}.{j}.linear.weight"].T + sd[f"{k}.{j}.linear.bias"])
    return h


def test_v2_requires_one_layer():
    with pytest.raises(ValueError, match="exactly one layer, got num_layers=2"):
        MedusaHeads(config(version=2, num_layers=2))


@pytest.mark.parametrize(
    "kw, match",
    [({"version": 3}, "Unsupported Medusa version 3"), ({"num_heads": 0}, "num_heads must be at least 1")],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_v2_logits_equal_base_lm_head_of_each_residual(dtype):
    sd = reference_tensors(3, 1, own_lm_heads=False)
    heads = heads_with(sd, config()).to(dtype)
    head = lm_head().to(dtype)
    x = torch.randn(5, H).to(dtype)
    with torch.no_grad():
        states = heads.hidden_states(x)
        logits = heads.logits(x, head)
    assert states.shape == (5, 3, H) and logits.shape == (5, 3, V) and logits.dtype == torch.float32
    tol = {} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    for k in range(3):
        sdk = {n: t.to(torch.float64) for n, t in sd.items()}
        h = by_hand(sdk, x.to(torch.float64), k, 1)
        torch.testing.assert_close(states[:, k].double(), h, **(tol or {"atol": 1e-5, "rtol": 1e-5}))
        expected = h @ head.weight.double().T
        torch.testing.assert_close(logits[:, k].double(), expected, **(tol or {"atol": 1e-4, "rtol": 1e-4}))


def test_v1_logits_use_each_heads_own_lm_head():
    sd = reference_tensors(2, 2, own_lm_heads=True)
    heads = heads_with(sd, config(version=1, num_heads=2, num_layers=2))
    x = torch.randn(4, H)
    with torch.no_grad():
        logits = heads.logits(x, lm_head())  # the base lm_head is not used by v1 heads
    for k in range(2):
        expected = by_hand(sd, x, k, 2) @ sd[f"{k}.2.weight"].T
        torch.testing.assert_close(logits[:, k], expected, atol=1e-4, rtol=1e-4)


def test_leading_dims_are_kept():
    heads = heads_with(reference_tensors(3, 1, False), config())
    x = torch.randn(2, 3, H)
    with torch.no_grad():
        logits = heads.logits(x, lm_head())
        flat = heads.logits(x.reshape(6, H), lm_head())
    assert logits.shape == (2, 3, 3, V)
    torch.testing.assert_close(logits.reshape(6, 3, V), flat)


def test_v1_layers_are_distinct_modules():
    heads = MedusaHeads(config(version=1, num_heads=2, num_layers=3))
    linears = [block.linear for blocks in heads.blocks for block in blocks]
    assert len({id(m) for m in linears}) == 6
    assert len(list(heads.parameters())) == 2 * (3 * 2 + 1)


def test_zero_init_makes_each_block_identity_plus_constant():
    heads = MedusaHeads.init_for_training(config(), None)
    assert torch.count_nonzero(heads.fc.weight) == 0
    assert torch.count_nonzero(heads.fc.bias) > 0  # nn.Linear's default bias init, as the reference keeps
    x = torch.randn(6, H)
    with torch.no_grad():
        offset = heads.hidden_states(x) - x.unsqueeze(1)  # SiLU(0 x + b): the same for every row
        torch.testing.assert_close(offset, F.silu(heads.fc.bias).view(1, 3, H).expand(6, 3, H))
        heads.fc.bias.zero_()
        assert torch.equal(heads.hidden_states(x), x.unsqueeze(1).expand(6, 3, H))


def test_v1_training_init_copies_the_base_lm_head():
    base = torch.randn(V, H)
    heads = MedusaHeads.init_for_training(config(version=1, num_layers=2), base)
    for lm in heads.lm_heads:
        assert torch.equal(lm.weight, base)
    assert all(torch.count_nonzero(block.linear.weight) == 0 for blocks in heads.blocks for block in blocks)
    with pytest.raises(ValueError, match="pass lm_head_weight"):
        MedusaHeads.init_for_training(config(version=1), None)
    with pytest.raises(ValueError, match=r"shape \[100, 16\], expected \[100, 32\]"):
        MedusaHeads.init_for_training(config(version=1), torch.randn(V, 16))


@pytest.mark.parametrize("version, layers", [(1, 2), (2, 1)])
def test_medusa_format_names_and_inverse(version, layers):
    heads = MedusaHeads(config(version=version, num_heads=2, num_layers=layers))
    sd = heads.state_dict_medusa_format()
    expected = {f"{k}.{j}.linear.{p}" for k in range(2) for j in range(layers) for p in ("weight", "bias")}
    if version == 1:
        expected |= {f"{k}.{layers}.weight" for k in range(2)}
    assert set(sd) == expected
    other = MedusaHeads(config(version=version, num_heads=2, num_layers=layers))
    other.load_medusa_format(sd)
    for name, t in other.state_dict_medusa_format().items():
        assert torch.equal(t, sd[name])


def test_load_medusa_format_errors_name_the_tensor():
    heads = MedusaHeads(config())
    sd = reference_tensors(3, 1, False)
    bad = dict(sd, **{"1.0.linear.weight": torch.zeros(H, H + 1)})
    with pytest.raises(ValueError, match=r"1\.0\.linear\.weight has shape \[32, 33\], expected \[32, 32\]"):
        heads.load_medusa_format(bad)
    with pytest.raises(ValueError, match=r"missing 2\.0\.linear\.bias"):
        heads.load_medusa_format({n: t for n, t in sd.items() if n != "2.0.linear.bias"})
    with pytest.raises(ValueError, match=r"unexpected 0\.1\.weight"):
        heads.load_medusa_format(dict(sd, **{"0.1.weight": torch.zeros(V, H)}))


def test_v2_heads_train_through_a_frozen_invariant_lm_head():
    heads = MedusaHeads.init_for_training(config(), None)
    x = torch.randn(4, H)
    loss = heads.logits(x, lm_head()).logsumexp(-1).sum()
    loss.backward()
    assert heads.fc.weight.grad is not None and torch.count_nonzero(heads.fc.weight.grad) > 0


def test_per_request_rule():
    default = config(num_heads=3)
    check_per_request(config(num_heads=3), default)
    with pytest.raises(ValueError, match="default Medusa adapter"):
        check_per_request(config(), None)
    with pytest.raises(ValueError, match="Medusa v1 adapters cannot be loaded per request"):
        check_per_request(config(version=1), default)
    with pytest.raises(ValueError, match="holds per-head LM heads"):
        check_per_request(config(version=2, own_lm_heads=True), default)
    with pytest.raises(ValueError, match="4 heads.*fixed the number of speculative tokens at 3"):
        check_per_request(config(num_heads=4), default)


@pytest.mark.skipif(
    not kernel_available(torch.bfloat16, torch.device("cpu")), reason="needs the batch-invariant CPU kernel"
)
@pytest.mark.parametrize("version, layers", [(1, 2), (2, 1)])
def test_rows_do_not_depend_on_the_batch(version, layers):
    # The speculative engine verifies drafts batched; a row's logits must not change with the row count.
    sd = reference_tensors(3, layers, own_lm_heads=version == 1)
    heads = heads_with(sd, config(version=version, num_layers=layers)).to(torch.bfloat16)
    head = lm_head().to(torch.bfloat16)
    x = torch.randn(7, H).to(torch.bfloat16)
    with torch.inference_mode():
        batched = heads.logits(x, head)
        for i in range(7):
            assert torch.equal(heads.logits(x[i : i + 1], head), batched[i : i + 1])
