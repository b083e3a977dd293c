"""Medusa adapter directories: round trips, the reference and legacy formats, checks, vLLM export."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from adapter_files import H, V, reference_tensors, write_reference_adapter
from safetensors.torch import load_file, save_file

from gorgon.adapters.medusa import MedusaConfig, MedusaHeads
from gorgon.adapters.medusa_io import (
    export_vllm,
    is_medusa_dir,
    load_medusa_adapter,
    parse_version,
    save_medusa_adapter,
)


class NotATensor:  # pickled into a legacy .pt to check that weights_only refuses it
    pass


def load(path, **kw):
    kw = {"hidden_size": H, "vocab_size": V, "dtype": torch.float32, "device": "cpu", **kw}
    return load_medusa_adapter(path, **kw)


def randomised(cfg: MedusaConfig) -> MedusaHeads:
    heads = MedusaHeads.init_for_training(cfg, torch.randn(V, H))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    return heads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("version, layers", [(1, 2), (2, 1)])
def test_save_load_round_trip_is_bitwise(tmp_path, version, layers, dtype):
    cfg = MedusaConfig(num_heads=3, num_layers=layers, version=version, hidden_size=H, vocab_size=V)
    heads = randomised(cfg).to(dtype)
    save_medusa_adapter(heads, tmp_path, "org/tiny-llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "medusa_lm_head.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "medusa_num_heads": 3,
        "medusa_num_layers": layers,
        "base_model_name_or_path": "org/tiny-llama",
        "version": version,
    }
    loaded = load(tmp_path, dtype=dtype, model_id="org/tiny-llama")
    assert loaded.config.version == version and loaded.has_own_lm_heads == (version == 1)
    assert loaded.config.num_heads == 3 and loaded.config.num_layers == layers
    assert loaded.config.base_model_name_or_path == "org/tiny-llama"
    original, back = heads.state_dict_medusa_format(), loaded.state_dict_medusa_format()
    assert set(original) == set(back)
    for name, t in original.items():
        assert back[name].dtype == dtype and torch.equal(back[name], t), name
    assert not loaded.training


@pytest.mark.parametrize("version", ["2", 2, 2.0])
def test_reference_v2_directory_with_version(tmp_path, version):
    sd = write_reference_adapter(tmp_path, version=version)
    heads = load(tmp_path)
    assert heads.config.version == 2 and not heads.has_own_lm_heads
    assert heads.config.base_model_name_or_path == "org/tiny-llama"
    for name, t in heads.state_dict_medusa_format().items():
        assert torch.equal(t, sd[name])


def test_reference_directory_without_version(tmp_path):
    write_reference_adapter(tmp_path / "v1", own_lm_heads=True)
    v1 = load(tmp_path / "v1")
    assert v1.config.version == 1 and v1.has_own_lm_heads
    # No version and no per-head LM heads: LoRAX runs it through the base lm_head, but it is still v1 for the
    # per-request rule.
    write_reference_adapter(tmp_path / "v2", own_lm_heads=False)
    v2 = load(tmp_path / "v2")
    assert v2.config.version == 1 and not v2.has_own_lm_heads


def test_version_parsing():
    assert parse_version(None) == 1 and parse_version("1") == 1 and parse_version("2.0") == 2
    with pytest.raises(ValueError, match="not a number"):
        parse_version("two")
    with pytest.raises(ValueError, match="Unsupported Medusa version"):
        parse_version(3)


def test_legacy_pt_is_read_with_weights_only(tmp_path):
    sd = write_reference_adapter(tmp_path / "ok", own_lm_heads=True, weights="medusa_lm_head.pt")
    heads = load(tmp_path / "ok")
    assert heads.has_own_lm_heads
    for name, t in heads.state_dict_medusa_format().items():
        assert torch.equal(t, sd[name])

    evil = tmp_path / "evil"
    write_reference_adapter(evil, weights="medusa_lm_head.pt")
    torch.save({**reference_tensors(3, 1, False), "payload": NotATensor()}, evil / "medusa_lm_head.pt")
    with pytest.raises(ValueError, match="Refusing to load .*medusa_lm_head.pt"):
        load(evil)


def test_heads_are_counted_from_the_tensors(tmp_path, caplog):
    write_reference_adapter(tmp_path, num_heads=3, config_heads=5, version=2)
    with caplog.at_level(logging.WARNING, logger="gorgon.adapters.medusa_io"):
        heads = load(tmp_path)
    assert heads.config.num_heads == 3
    assert "medusa_num_heads=5 but the tensors hold 3" in caplog.text


def test_shape_mismatch_errors(tmp_path):
    write_reference_adapter(tmp_path / "v2", version=2)
    with pytest.raises(ValueError, match="has hidden size 32 but the model has 64: it does not fit"):
        load(tmp_path / "v2", hidden_size=64)
    load(tmp_path / "v2", vocab_size=120)  # v2 heads use the model's lm_head: any vocabulary fits
    write_reference_adapter(tmp_path / "v1", own_lm_heads=True)
    with pytest.raises(ValueError, match="predicts over 100 tokens but the model's vocabulary has 120"):
        load(tmp_path / "v1", vocab_size=120)


def test_v2_layout_with_two_layers_is_refused(tmp_path):
    write_reference_adapter(tmp_path, num_layers=2, version=2)  # no per-head LM heads
    with pytest.raises(ValueError, match="2 layers per head but no per-head LM heads"):
        load(tmp_path)


def test_base_model_mismatch_only_warns(tmp_path, caplog):
    write_reference_adapter(tmp_path, version=2, base="lmsys/vicuna-7b-v1.3")
    with caplog.at_level(logging.WARNING, logger="gorgon.adapters.medusa_io"):
        load(tmp_path, model_id="/models/vicuna-7b-v1.3")
        assert "trained on" not in caplog.text  # same name, other location
        load(tmp_path, model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "was trained on lmsys/vicuna-7b-v1.3, not HuggingFaceTB/SmolLM2-135M-Instruct" in caplog.text


def test_weight_files(tmp_path):
    # Without medusa_lm_head.safetensors every root-level *.safetensors is read; other tensors are ignored.
    sd = write_reference_adapter(tmp_path, version=2, weights="heads.safetensors")
    save_file(
        {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, H)}, str(tmp_path / "lora.safetensors")
    )
    heads = load(tmp_path)
    assert torch.equal(heads.state_dict_medusa_format()["2.0.linear.bias"], sd["2.0.linear.bias"])
    # medusa_lm_head.safetensors wins over the rest.
    save_file(reference_tensors(2, 1, False, seed=5), str(tmp_path / "medusa_lm_head.safetensors"))
    assert load(tmp_path).config.num_heads == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"medusa_num_heads": 2, "medusa_num_layers": 1}))
    with pytest.raises(ValueError, match="No Medusa weights in"):
        load(empty)


def test_is_medusa_dir(tmp_path):
    write_reference_adapter(tmp_path / "m")
    assert is_medusa_dir(tmp_path / "m") and is_medusa_dir(str(tmp_path / "m"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert not is_medusa_dir(tmp_path / "model") and not is_medusa_dir(tmp_path / "broken")
    assert not is_medusa_dir(tmp_path / "nothing-here")


def test_export_vllm_v2(tmp_path):
    sd = write_reference_adapter(tmp_path / "a", version="2")
    base = torch.randn(V, H)
    with pytest.raises(ValueError, match="needs the base model's lm_head"):
        export_vllm(tmp_path / "a", tmp_path / "out", None)
    export_vllm(tmp_path / "a", tmp_path / "out", base)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "num_heads": 3,
        "num_hidden_layers": 1,
        "hidden_size": H,
        "vocab_size": V,
        "medusa_fc_bias": True,
        "original_lm_head": True,
    }
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = {f"blocks.{k}.layers.0.{p}" for k in range(3) for p in ("weight", "bias")} | {
        "lm_heads.0.weight"
    }
    assert set(tensors) == expected
    assert torch.equal(tensors["blocks.1.layers.0.weight"], sd["1.0.linear.weight"])
    assert torch.equal(tensors["blocks.2.layers.0.bias"], sd["2.0.linear.bias"])
    assert torch.equal(tensors["lm_heads.0.weight"], base)


def test_export_vllm_v1(tmp_path):
    sd = write_reference_adapter(tmp_path / "a", num_heads=2, num_layers=2, own_lm_heads=True)
    export_vllm(tmp_path / "a", tmp_path / "out", None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_heads"] == 2 and config["num_hidden_layers"] == 2 and config["vocab_size"] == V
    assert config["original_lm_head"] is False and config["medusa_fc_bias"] is True
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = {f"blocks.{k}.layers.{j}.{p}" for k in range(2) for j in range(2) for p in ("weight", "bias")}
    assert set(tensors) == expected | {"lm_heads.0.weight", "lm_heads.1.weight"}
    assert torch.equal(tensors["blocks.1.layers.1.weight"], sd["1.1.linear.weight"])
    assert torch.equal(tensors["lm_heads.1.weight"], sd["1.2.weight"])
