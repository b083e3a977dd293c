"""inspect_adapter on Medusa v1/v2, LoRA and joint directories, and `gorgon adapter info` through main()."""

from __future__ import annotations

import pytest
from adapter_files import H, V, write_lora_adapter, write_reference_adapter

from gorgon.adapters.medusa_io import inspect_adapter
from gorgon.cli import main


def test_inspect_v2(tmp_path):
    write_reference_adapter(tmp_path, version="2", config_heads=4)
    info = inspect_adapter(tmp_path)
    assert info["type"] == "medusa" and info["lora"] is None and "usable" not in info
    m = info["medusa"]
    assert (m["version"], m["layout"], m["has_own_lm_heads"]) == (2, "v2", False)
    assert (m["num_heads"], m["config_num_heads"], m["num_layers"]) == (3, 4, 1)
    assert (m["hidden_size"], m["vocab_size"]) == (H, None)
    assert m["num_params"] == 3 * (H * H + H) and m["size_bytes"] == 4 * m["num_params"]
    assert m["dtypes"] == ["F32"] and m["files"] == ["medusa_lm_head.safetensors"]
    assert m["per_request_problem"] is None
    assert any("medusa_num_heads=4" in n for n in m["notes"])

    usable = inspect_adapter(tmp_path, hidden_size=H, vocab_size=V, model_id="org/tiny-llama")["usable"]
    assert usable["default"] == {"ok": True, "reasons": []}
    assert usable["per_request"] == {"ok": True, "reasons": []}
    assert any("default Medusa adapter with 3 heads" in n for n in usable["notes"])


def test_inspect_v1_legacy(tmp_path):
    write_reference_adapter(
        tmp_path, num_heads=2, num_layers=2, own_lm_heads=True, weights="medusa_lm_head.pt"
    )
    info = inspect_adapter(tmp_path, hidden_size=H, vocab_size=V + 1, model_id="other/model")
    m = info["medusa"]
    assert (m["version"], m["version_declared"], m["layout"], m["vocab_size"]) == (1, False, "v1", V)
    assert m["num_params"] == 2 * (2 * (H * H + H) + V * H)
    assert m["per_request_problem"].startswith("Medusa v1 adapters cannot be loaded per request")
    usable = info["usable"]
    assert (
        not usable["default"]["ok"] and "predict 100 tokens, the model 101" in usable["default"]["reasons"][0]
    )
    assert not usable["per_request"]["ok"] and len(usable["per_request"]["reasons"]) == 2
    assert any("trained on org/tiny-llama, not other/model" in n for n in usable["notes"])


def test_inspect_lora_and_joint(tmp_path):
    write_lora_adapter(tmp_path)
    info = inspect_adapter(tmp_path, hidden_size=H, vocab_size=V)
    lora = info["lora"]
    assert info["type"] == "lora" and info["medusa"] is None
    assert (lora["peft_type"], lora["rank"], lora["alpha"]) == ("LORA", 4, 8)
    assert lora["target_modules"] == ["q_proj", "v_proj"]
    assert lora["module_shapes"] == {"q_proj": {"in": [H], "out": [H]}, "v_proj": {"in": [H], "out": [16]}}
    assert lora["num_params"] == 2 * (4 * H * 2 + 4 * H + 16 * 4)
    assert info["usable"]["default"]["ok"] and info["usable"]["per_request"]["ok"]
    assert not inspect_adapter(tmp_path, hidden_size=64, vocab_size=V)["usable"]["default"]["ok"]

    write_reference_adapter(tmp_path, version=2)  # LoRA trained jointly with its own Medusa heads
    assert inspect_adapter(tmp_path)["type"] == "lora+medusa"


def test_inspect_refuses_other_directories(tmp_path):
    with pytest.raises(ValueError, match="is not an adapter"):
        inspect_adapter(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        inspect_adapter(tmp_path / "missing")


def test_cli_adapter_info(tmp_path, tiny_model_dir, capsys):
    write_reference_adapter(tmp_path / "v2", version="2")
    assert main(["adapter", "info", str(tmp_path / "v2"), "--adapter-source", "local"]) == 0
    out = capsys.readouterr().out
    assert "Medusa v2 (version 2): 3 heads x 1 layer(s), through the base lm_head" in out
    assert "base model: org/tiny-llama" in out and "3,168 parameters, 12,672 bytes (F32)" in out
    assert "Pass --model-id" in out

    assert main(["adapter", "info", str(tmp_path / "v2"), "--model-id", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "as the default adapter (--adapter-id): yes" in out and "per request: yes" in out

    write_reference_adapter(tmp_path / "v1", own_lm_heads=True)
    assert main(["adapter", "info", str(tmp_path / "v1"), "--model-id", str(tiny_model_dir)]) == 0
    out = capsys.readouterr().out
    assert "Medusa v1 (no version in config.json: 1)" in out and "its own LM heads" in out
    assert "as the default adapter (--adapter-id): yes" in out and "per request: no" in out
    assert "Medusa v1 adapters cannot be loaded per request" in out

    write_lora_adapter(tmp_path / "lora")
    assert main(["adapter", "info", str(tmp_path / "lora"), "--adapter-source", "local"]) == 0
    assert "LoRA (LORA): rank 4, alpha 8, targets q_proj, v_proj" in capsys.readouterr().out


def test_cli_adapter_info_errors(tmp_path, caplog):
    assert main(["adapter", "info", str(tmp_path / "missing"), "--adapter-source", "local"]) == 2
    assert "no such directory" in caplog.text
    assert main(["adapter", "info", str(tmp_path), "--adapter-source", "local"]) == 2
    assert "is not an adapter" in caplog.text
