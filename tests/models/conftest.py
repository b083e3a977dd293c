"""Fixtures for the loader tests: a tiny trained tokenizer and a tiny Llama written as a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["Deep learning is a subfield of machine learning.", "Hello world! 你好 😀", "The lazy dog."] * 10


@pytest.fixture(scope="session")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer trained on a few sentences (about 300 tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """An empty GORGON_CACHE_DIR, and a hub that is offline with an empty HF cache."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "gorgon-cache"
    monkeypatch.setenv("GORGON_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time; patch the module too.
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return cache


@pytest.fixture(scope="session")
def write_tiny_gguf():
    """`write_tiny_gguf(path, tokenizer)`: a fixture, so tests need not import this conftest by name."""
    return _write_tiny_gguf


def _write_tiny_gguf(path: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer tied-embedding Llama in float32 GGUF with a gpt2-style tokenizer; returns its tensors."""
    import gguf

    hidden, ffn, layers, heads, kv_heads = 32, 64, 2, 4, 2
    head_dim = hidden // heads
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])  # 3 = control
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<s>"])
    w.add_eos_token_id(vocab["</s>"])
    w.add_unk_token_id(vocab["<unk>"])
    w.add_add_bos_token(False)

    rng = np.random.default_rng(seed)
    tensors = {"token_embd.weight": rng.standard_normal((n_vocab, hidden), dtype=np.float32)}
    tensors["output_norm.weight"] = 1 + 0.1 * rng.standard_normal(hidden, dtype=np.float32)
    for i in range(layers):
        shapes = {
            "attn_norm": (hidden,),
            "attn_q": (hidden, hidden),
            "attn_k": (kv_heads * head_dim, hidden),
            "attn_v": (kv_heads * head_dim, hidden),
            "attn_output": (hidden, hidden),
            "ffn_norm": (hidden,),
            "ffn_gate": (ffn, hidden),
            "ffn_up": (ffn, hidden),
            "ffn_down": (hidden, ffn),
        }
        for name, shape in shapes.items():
            tensors[f"blk.{i}.{name}.weight"] = 0.1 * rng.standard_normal(shape, dtype=np.float32)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors
