"""The base model's hidden states, as Gorgon's model computes them for training: equal to HF's last hidden
state (after the final norm) in float32, however sequences are packed, and reused from the disk cache."""

from __future__ import annotations

import torch
import transformers

from gorgon.models.loader import resolve_checkpoint
from gorgon.training.features import base_lm_head_weight, cached_hidden_states, hidden_states, load_base_model


def _sequences():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in (50, 7, 130, 31, 1)]


def test_hidden_states_equal_hf_last_hidden_state(tiny_model_dir):
    ckpt = resolve_checkpoint(str(tiny_model_dir))
    model, dtype = load_base_model(ckpt, "float32", torch.device("cpu"))
    assert dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    seqs = _sequences()
    # max_rows=64 packs the short ones together and runs the 130-token one alone
    for got in (hidden_states(model, seqs, max_rows=64), hidden_states(model, seqs, max_rows=4096)):
        for seq, h in zip(seqs, got):
            with torch.no_grad():
                ref = hf.model(torch.tensor([seq])).last_hidden_state[0]
            assert h.shape == (len(seq), hf.config.hidden_size) and h.dtype == torch.float32
            assert not h.is_inference()  # the heads' autograd saves it for backward
            torch.testing.assert_close(h, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(base_lm_head_weight(str(tiny_model_dir)), hf.lm_head.weight.detach())


def test_bfloat16_states_and_disk_cache(tiny_model_dir, tmp_path, monkeypatch):
    ckpt = resolve_checkpoint(str(tiny_model_dir))
    model, _ = load_base_model(ckpt, "bfloat16", torch.device("cpu"))
    seqs = _sequences()
    first = cached_hidden_states(model, seqs, tmp_path, "key")
    assert all(h.dtype == torch.bfloat16 for h in first)
    assert len(list(tmp_path.glob("hidden-*.safetensors"))) == 1

    def fail(*a, **k):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr("gorgon.training.features.hidden_states", fail)
    again = cached_hidden_states(model, seqs, tmp_path, "key")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    monkeypatch.undo()
    cached_hidden_states(model, seqs[:2], tmp_path, "key")  # other data: another file
    cached_hidden_states(model, seqs, tmp_path, "other model")
    assert len(list(tmp_path.glob("hidden-*.safetensors"))) == 3
    # States computed over another KV cache dtype (float32 on CPUs before session 6) are not these.
    monkeypatch.setattr("gorgon.training.features.kv_cache_dtype", lambda dtype, device: torch.float32)
    cached_hidden_states(model, seqs, tmp_path, "key")
    assert len(list(tmp_path.glob("hidden-*.safetensors"))) == 4
