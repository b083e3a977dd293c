"""Fixtures for the adapter tests; the hand-built adapter files are in adapter_files.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from adapter_files import H, V


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer) -> Path:
    """A tiny Llama checkpoint (hidden 32, vocabulary 100) that `resolve_checkpoint` accepts."""
    from helpers import tiny_hf_model

    model = tiny_hf_model("llama", hidden_size=H, vocab_size=V, intermediate_size=64)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
