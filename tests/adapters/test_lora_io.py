"""PEFT LoRA adapters, saved by PEFT itself from tiny random models, read into Gorgon's layout.

Every check compares with what PEFT holds in memory for the same adapter: lora_A, lora_B and `scaling`.
"""

from __future__ import annotations

import json
import logging
import re

import peft
import pytest
import torch
from helpers import tiny_hf_model
from safetensors.torch import load_file, save_file

from gorgon.adapters.lora import (
    TARGETS,
    LoraConfig,
    is_lora_dir,
    load_lora_adapter,
    lora_nbytes_on_disk,
)
from gorgon.config import ModelConfig

pytestmark = [
    # PEFT announces that it saves the frozen lm_head next to a LoRA on lm_head: expected here.
    pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning"),
    # get_peft_model calls a transformers API that transformers 5 deprecates: not ours to fix.
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

PROJECTIONS = list(TARGETS[:-1])
_MODULE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def save_peft_adapter(
    path,
    *,
    family="llama",
    seed=0,
    model_overrides=None,
    safe=True,
    save_embedding_layers="auto",
    **lora_kwargs,
):
    """A PEFT LoRA on a tiny `family` model with random lora_B (PEFT starts it at zero), saved in `path`.

    Returns (peft model, the base model's ModelConfig)."""
    model = tiny_hf_model(family, seed=seed, **(model_overrides or {}))
    config = ModelConfig.from_hf(model.config.to_dict())
    lora_kwargs.setdefault("target_modules", PROJECTIONS)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for module in lora_layers(peft_model).values():
            if "default" in module.lora_B:
                torch.nn.init.normal_(module.lora_B["default"].weight)
            else:  # a LoRA Embedding (refused by Gorgon, but saved first)
                torch.nn.init.normal_(module.lora_embedding_B["default"])
    peft_model.save_pretrained(
        str(path), safe_serialization=safe, save_embedding_layers=save_embedding_layers
    )
    return peft_model, config


def lora_layers(peft_model) -> dict[str, peft.tuners.lora.LoraLayer]:
    """PEFT's LoRA layers by module name (`base_model.model.model.layers.0.self_attn.q_proj`)."""
    return {n: m for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def gorgon_weight(adapter, module_name: str):
    if module_name.endswith("lm_head"):
        return adapter.lm_head
    layer, target = _MODULE.search(module_name).groups()
    return adapter.layers[int(layer)].get(target)


def assert_matches_peft(adapter, peft_model, dtype) -> None:
    """Every LoRA module of PEFT is in the adapter with PEFT's A, B and scaling, and nothing else is."""
    expected = lora_layers(peft_model)
    assert expected
    for name, module in expected.items():
        weight = gorgon_weight(adapter, name)
        assert weight is not None, name
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        assert weight.a.dtype == weight.b_t.dtype == dtype
        assert weight.a.is_contiguous() and weight.b_t.is_contiguous()
        assert torch.equal(weight.a, a.detach().to(dtype)), name
        assert torch.equal(weight.b_t, b.detach().to(dtype).T), name
        assert weight.scale == module.scaling["default"], name
    held = sum(len(layer) for layer in adapter.layers) + (adapter.lm_head is not None)
    assert held == len(expected)


def tensor_bytes(adapter) -> int:
    weights = [w for layer in adapter.layers for w in layer.values()]
    weights += [adapter.lm_head] if adapter.lm_head is not None else []
    return sum(t.numel() * t.element_size() for w in weights for t in (w.a, w.b_t))


def rewrite_config(path, **changes) -> None:
    file = path / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


CASES = {
    "r8-all-projections": {"r": 8, "lora_alpha": 16},
    "r1-q-v-mistral": {"family": "mistral", "r": 1, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
    "r16-heads-qwen2": {
        "family": "qwen2",
        "r": 16,
        "lora_alpha": 8,
        "target_modules": ["lm_head", "o_proj", "down_proj"],
    },
    "rslora-tied-mha": {"family": "tied-mha", "r": 8, "lora_alpha": 16, "use_rslora": True},
    "rank-and-alpha-patterns": {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"q_proj": 4, "model.layers.1.mlp.down_proj": 2},
        "alpha_pattern": {"v_proj": 3, "layers.0.self_attn.o_proj": 5, "gate_proj": 7},
    },
    "layers-to-transform": {
        "r": 8,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "k_proj"],
        "layers_to_transform": [1],
    },
    "regex-targets": {"r": 4, "lora_alpha": 8, "target_modules": r"model\.layers\.0\..*\.(k_proj|up_proj)"},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_matches_peft(tmp_path, case, dtype):
    peft_model, config = save_peft_adapter(tmp_path, **CASES[case])
    adapter = load_lora_adapter(tmp_path, config, dtype=dtype, device="cpu", adapter_id="org/adapter")
    assert_matches_peft(adapter, peft_model, dtype)
    assert adapter.adapter_id == "org/adapter"
    assert adapter.nbytes == tensor_bytes(adapter)
    assert len(adapter.layers) == config.num_layers


def test_overlapping_patterns_match_peft_reloading_the_files(tmp_path):
    """Two patterns match layers.1 q_proj: PEFT takes the first in the file (which it writes with sorted
    keys; the order here is already sorted, so training and reloading agree)."""
    patterns = {
        "rank_pattern": {"layers.1.self_attn.q_proj": 2, "q_proj": 4},
        "alpha_pattern": {"model.layers.1.self_attn.q_proj": 5, "self_attn.q_proj": 3},
    }
    _, config = save_peft_adapter(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj"], **patterns)
    reloaded = peft.PeftModel.from_pretrained(tiny_hf_model("llama"), str(tmp_path))
    adapter = load_lora_adapter(tmp_path, config, dtype=torch.float32, device="cpu")
    assert_matches_peft(adapter, reloaded, torch.float32)
    assert adapter.layers[1]["q_proj"].scale == 5 / 2


def test_patterns_follow_the_file_order(tmp_path):
    save_peft_adapter(tmp_path, r=8, lora_alpha=16, target_modules=["q_proj"])
    rewrite_config(tmp_path, rank_pattern={"q_proj": 4, "layers.1.self_attn.q_proj": 2})
    cfg = LoraConfig.from_file(tmp_path)
    assert cfg.rank_for("model.layers.1.self_attn.q_proj") == 4  # first match, as PEFT's get_pattern_key
    assert cfg.rank_for("model.layers.1.self_attn.k_proj") == 8
    assert cfg.rank_for("model.layers.1.self_attn.xq_proj") == 8  # matched at a dot boundary only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_onto_the_serving_device(tmp_path):
    peft_model, config = save_peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    adapter = load_lora_adapter(tmp_path, config, dtype=torch.bfloat16, device="cuda")
    weight = adapter.layers[0]["q_proj"]
    assert weight.a.device.type == weight.b_t.device.type == adapter.lm_head.a.device.type == "cuda"
    a = lora_layers(peft_model)["base_model.model.model.layers.0.self_attn.q_proj"].lora_A["default"].weight
    assert torch.equal(weight.a.cpu(), a.detach().to(torch.bfloat16))


def test_targets_and_layers_follow_the_tensors(tmp_path):
    _, config = save_peft_adapter(tmp_path, **CASES["layers-to-transform"])
    adapter = load_lora_adapter(tmp_path, config, dtype=torch.float32, device="cpu")
    assert adapter.layers[0] == {}
    assert set(adapter.layers[1]) == {"q_proj", "k_proj"}
    assert adapter.targets() == {"q_proj", "k_proj"}
    assert adapter.lm_head is None
    assert adapter.adapter_id == str(tmp_path)  # no id given: the directory names it


def test_regex_targets_leave_config_targets_empty(tmp_path):
    _, config = save_peft_adapter(tmp_path, **CASES["regex-targets"])
    adapter = load_lora_adapter(tmp_path, config, dtype=torch.float32, device="cpu")
    assert adapter.config.targets == ()
    assert adapter.targets() == {"k_proj", "up_proj"}
    assert set(adapter.layers[0]) == {"k_proj", "up_proj"} and adapter.layers[1] == {}


def test_delta_is_what_peft_adds(tmp_path):
    """scale * (x @ a.T) @ b_t is the output PEFT's LoRA Linear adds to its base layer."""
    peft_model, config = save_peft_adapter(
        tmp_path, r=8, lora_alpha=16, target_modules=PROJECTIONS + ["lm_head"]
    )
    adapter = load_lora_adapter(tmp_path, config, dtype=torch.float32, device="cpu")
    torch.manual_seed(3)
    for name, module in lora_layers(peft_model).items():
        weight = gorgon_weight(adapter, name)
        x = torch.randn(5, weight.a.shape[1])
        with torch.no_grad():
            want = module(x) - module.base_layer(x)
        got = weight.scale * (x @ weight.a.T) @ weight.b_t
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lm_head_base_copy_is_skipped(tmp_path):
    """With lm_head targeted PEFT saves the frozen lm_head too: neither loaded nor counted in the budget."""
    peft_model, config = save_peft_adapter(tmp_path, r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    file = tmp_path / "adapter_model.safetensors"
    assert "base_model.model.lm_head.base_layer.weight" in load_file(file)
    adapter = load_lora_adapter(tmp_path, config, dtype=torch.float32, device="cpu")
    assert_matches_peft(adapter, peft_model, torch.float32)
    assert adapter.targets() == {"lm_head", "q_proj"}
    lm_head_bytes = config.vocab_size * config.hidden_size * 4
    assert lora_nbytes_on_disk(tmp_path) == file.stat().st_size - lm_head_bytes


def test_config_from_file(tmp_path):
    save_peft_adapter(
        tmp_path,
        r=8,
        lora_alpha=32,
        target_modules=["v_proj", "q_proj"],
        use_rslora=True,
    )
    rewrite_config(tmp_path, base_model_name_or_path="org/tiny-llama")
    cfg = LoraConfig.from_file(tmp_path)
    assert (cfg.rank, cfg.alpha, cfg.use_rslora) == (8, 32.0, True)
    assert cfg.targets == ("q_proj", "v_proj")  # TARGETS' order
    assert cfg.base_model_name_or_path == "org/tiny-llama"
    assert LoraConfig.from_file(tmp_path / "adapter_config.json") == cfg
    assert cfg.scale("model.layers.0.self_attn.q_proj", 4) == 32 / 2


def test_all_linear_names_every_projection(tmp_path):
    save_peft_adapter(tmp_path, r=2, lora_alpha=2)
    rewrite_config(tmp_path, target_modules="all-linear")
    assert LoraConfig.from_file(tmp_path).targets == tuple(PROJECTIONS)


def test_legacy_bin_loads(tmp_path):
    peft_model, config = save_peft_adapter(tmp_path, safe=False, r=4, lora_alpha=8)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    adapter = load_lora_adapter(tmp_path, config, dtype=torch.bfloat16, device="cpu")
    assert_matches_peft(adapter, peft_model, torch.bfloat16)
    assert lora_nbytes_on_disk(tmp_path) == (tmp_path / "adapter_model.bin").stat().st_size


def test_keys_with_the_adapter_name_load(tmp_path):
    """Older PEFT versions saved `lora_A.default.weight`."""
    peft_model, config = save_peft_adapter(
        tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]
    )
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, str(file))
    adapter = load_lora_adapter(tmp_path, config, dtype=torch.float32, device="cpu")
    assert_matches_peft(adapter, peft_model, torch.float32)


def test_safetensors_preferred_over_bin(tmp_path):
    peft_model, config = save_peft_adapter(tmp_path, r=4, lora_alpha=8)
    torch.save({"garbage": torch.zeros(1)}, tmp_path / "adapter_model.bin")  # would fail if read
    adapter = load_lora_adapter(tmp_path, config, dtype=torch.float32, device="cpu")
    assert_matches_peft(adapter, peft_model, torch.float32)
    assert lora_nbytes_on_disk(tmp_path) == (tmp_path / "adapter_model.safetensors").stat().st_size


def test_is_lora_dir(tmp_path):
    assert not is_lora_dir(tmp_path)
    save_peft_adapter(tmp_path, r=2, lora_alpha=2)
    assert is_lora_dir(tmp_path)
    assert is_lora_dir(str(tmp_path))


def test_other_base_model_name_only_warns(tmp_path, caplog):
    peft_model, config = save_peft_adapter(tmp_path, r=2, lora_alpha=2)
    rewrite_config(tmp_path, base_model_name_or_path="org/another-model")
    with caplog.at_level(logging.WARNING, logger="gorgon.adapters.lora"):
        adapter = load_lora_adapter(tmp_path, config, dtype=torch.float32, device="cpu", model_id="org/tiny")
    assert_matches_peft(adapter, peft_model, torch.float32)
    assert "org/another-model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gorgon.adapters.lora"):
        load_lora_adapter(
            tmp_path, config, dtype=torch.float32, device="cpu", model_id="/models/Another-Model"
        )
    assert caplog.text == ""  # same name, other spelling


# --- errors ----------------------------------------------------------------------------------------------


def load_error(path, config, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        load_lora_adapter(path, config, dtype=torch.float32, device="cpu", adapter_id="org/adapter", **kwargs)
    return str(info.value)


def test_other_hidden_size_is_refused(tmp_path):
    save_peft_adapter(tmp_path, r=8, lora_alpha=8, model_overrides={"hidden_size": 128})
    _, smaller = save_peft_adapter(tmp_path / "other", r=8, lora_alpha=8)
    assert load_error(tmp_path, smaller) == (
        "LoRA adapter org/adapter was trained for another base model: layers.0.self_attn.q_proj.lora_A has "
        "shape (8, 128), this model expects (8, 64)."
    )


def test_other_kv_heads_is_refused(tmp_path):
    save_peft_adapter(
        tmp_path, r=4, lora_alpha=4, target_modules=["v_proj"], model_overrides={"num_key_value_heads": 4}
    )
    _, gqa = save_peft_adapter(tmp_path / "other", r=4, lora_alpha=4)
    assert "layers.0.self_attn.v_proj.lora_B has shape (64, 4), this model expects (32, 4)" in load_error(
        tmp_path, gqa
    )


def test_more_layers_than_the_model_is_refused(tmp_path):
    save_peft_adapter(
        tmp_path, r=2, lora_alpha=2, target_modules=["q_proj"], model_overrides={"num_hidden_layers": 3}
    )
    _, two_layers = save_peft_adapter(tmp_path / "other", r=2, lora_alpha=2)
    message = load_error(tmp_path, two_layers)
    assert "layers.2.self_attn.q_proj" in message and "2 layers" in message


@pytest.mark.parametrize(
    "lora_kwargs, expected",
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias: 'all'"),
        ({"bias": "lora_only"}, "bias: 'lora_only'"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["embed_tokens", "q_proj"]}, "targets embed_tokens"),
    ],
    ids=["dora", "bias-all", "bias-lora-only", "modules-to-save", "embed-tokens"],
)
def test_unsupported_peft_features_are_refused(tmp_path, lora_kwargs, expected):
    _, config = save_peft_adapter(tmp_path, **{"r": 4, "lora_alpha": 4, **lora_kwargs})
    message = load_error(tmp_path, config)
    assert "org/adapter" in message and expected in message


def test_embed_tokens_error_lists_supported_targets(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    assert ", ".join(TARGETS) in load_error(tmp_path, config)


def test_embed_tokens_through_a_regex_is_refused_by_its_tensors(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4, target_modules=r".*(embed_tokens|q_proj)")
    message = load_error(tmp_path, config)
    assert "model.embed_tokens" in message and "q_proj" in message


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"peft_type": "IA3"}, "PEFT IA3 adapter"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"target_modules": ["q_proj", "fc1"]}, "targets fc1"),
        ({"target_modules": 3}, "target_modules"),
        ({"r": 0}, "r in adapter_config.json must be a positive integer"),
        ({"lora_alpha": "sixteen"}, "lora_alpha in adapter_config.json must be a number"),
        ({"rank_pattern": {"q_proj(": 4}}, "rank_pattern key 'q_proj('"),
        ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern['q_proj']"),
    ],
)
def test_config_errors(tmp_path, changes, expected):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4)
    rewrite_config(tmp_path, **changes)
    message = load_error(tmp_path, config)
    assert "org/adapter" in message and expected in message


def test_lm_head_copy_of_another_vocabulary_is_refused(tmp_path):
    save_peft_adapter(
        tmp_path, r=4, lora_alpha=4, target_modules=["lm_head"], model_overrides={"vocab_size": 400}
    )
    _, config = save_peft_adapter(tmp_path / "other", r=4, lora_alpha=4)
    message = load_error(tmp_path, config)
    assert "trained for another base model" in message
    assert "lm_head.base_layer.weight has shape (400, 64), this model expects (320, 64)" in message


def test_full_embedding_copies_are_refused(tmp_path):
    _, config = save_peft_adapter(
        tmp_path, r=4, lora_alpha=4, target_modules=["q_proj"], save_embedding_layers=True
    )
    message = load_error(tmp_path, config)
    assert "holds a full" in message and "save_embedding_layers=False" in message


def test_unpaired_lora_a_is_refused(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(file))
    message = load_error(tmp_path, config)
    assert "layers.1.self_attn.v_proj.lora_A" in message and "without its lora_B" in message


def test_unpaired_lora_b_is_refused(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4, target_modules=["q_proj"])
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    save_file(tensors, str(file))
    assert "layers.0.self_attn.q_proj.lora_B" in load_error(tmp_path, config)


def test_rank_mismatch_between_a_and_b_is_refused(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4, target_modules=["q_proj"])
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = tensors[key][:, :2].contiguous()
    save_file(tensors, str(file))
    assert "inconsistent" in load_error(tmp_path, config)


def test_unknown_key_is_refused(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4, target_modules=["q_proj"])
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(tensors, str(file))
    assert "lora_magnitude_vector" in load_error(tmp_path, config)


def test_two_adapters_in_one_file_are_refused(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4, target_modules=["q_proj"])
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors |= {k.replace(".weight", ".other.weight"): v.clone() for k, v in tensors.items()}
    save_file(tensors, str(file))
    assert "two lora_" in load_error(tmp_path, config)


def test_empty_file_is_refused(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4)
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    assert "no LoRA weights" in load_error(tmp_path, config)


def test_truncated_safetensors_is_corrupt(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4)
    file = tmp_path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    message = load_error(tmp_path, config)
    assert "adapter_model.safetensors is corrupt" in message


def test_garbage_safetensors_is_corrupt(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 3)
    assert "corrupt" in load_error(tmp_path, config)


def test_truncated_bin_is_corrupt(tmp_path):
    _, config = save_peft_adapter(tmp_path, safe=False, r=4, lora_alpha=4)
    file = tmp_path / "adapter_model.bin"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    assert "adapter_model.bin is corrupt" in load_error(tmp_path, config)


class Payload:
    """Any object a pickle could carry: weights_only must refuse it."""


def test_pickled_object_is_refused(tmp_path):
    _, config = save_peft_adapter(tmp_path, safe=False, r=4, lora_alpha=4)
    torch.save({"x": Payload()}, tmp_path / "adapter_model.bin")
    assert "refusing to load adapter_model.bin" in load_error(tmp_path, config)


def test_pickle_that_is_not_a_dict_of_tensors_is_refused(tmp_path):
    _, config = save_peft_adapter(tmp_path, safe=False, r=4, lora_alpha=4)
    torch.save([torch.zeros(2)], tmp_path / "adapter_model.bin")
    assert "flat dict of tensors" in load_error(tmp_path, config)


def test_missing_weights_are_refused(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4)
    (tmp_path / "adapter_model.safetensors").unlink()
    assert "has no weights" in load_error(tmp_path, config)
    with pytest.raises(ValueError, match="has no weights"):
        lora_nbytes_on_disk(tmp_path)


def test_missing_config_is_refused(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4)
    (tmp_path / "adapter_config.json").unlink()
    assert "no adapter_config.json" in load_error(tmp_path, config)


def test_invalid_json_is_refused(tmp_path):
    _, config = save_peft_adapter(tmp_path, r=4, lora_alpha=4)
    (tmp_path / "adapter_config.json").write_text("{not json")
    assert "not valid JSON" in load_error(tmp_path, config)
