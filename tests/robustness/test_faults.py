"""Faults injected into one request fail that request alone (incomplete_generation) while the rest of its
batch carries on with the tokens it would have had anyway; deadlines; nothing is lost or leaked."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_tokenizer, tiny_hf_model
from robustness_report import record

import gorgon.engine.llm_engine as llm_engine_module
from gorgon.config import EngineConfig
from gorgon.engine.llm_engine import LLMEngine
from gorgon.engine.request import (
    ErrorOutput,
    FinalOutput,
    GenerationRequest,
    SamplingParams,
    StoppingParams,
)
from gorgon.models.factory import build_model
from gorgon.models.loader import resolve_checkpoint

CONFIG = EngineConfig(max_input_length=64, max_total_tokens=160, max_batch_total_tokens=2048)
PROMPTS = [[5, 9, 11, 40, 3], [7, 7, 8, 100, 101, 102], [60, 61, 62], [9, 8, 7, 6]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults")
    tok = build_tiny_tokenizer(path)
    tiny_hf_model("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id).save_pretrained(str(path))
    return resolve_checkpoint(str(path))


def _engine(ckpt, config=CONFIG) -> LLMEngine:
    model = build_model(ckpt, torch.float32, torch.device("cpu"))
    return LLMEngine(model, ckpt.tokenizer, config, torch.float32, torch.device("cpu"), {2})


def _run(engine, requests, lora=None):
    """Run requests to completion; returns per request the final output or the error."""
    results = {}
    for i, req in enumerate(requests):
        engine.add_request(req, lambda out, i=i: _keep(results, i, out), lora=(lora or {}).get(i))
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 5000
    return results


def _keep(results, i, out):
    if isinstance(out, (FinalOutput, ErrorOutput)):
        results[i] = out


def _request(prompt, max_new=24, seed=None):
    sampling = SamplingParams() if seed is None else SamplingParams(temperature=0.8, seed=seed)
    return GenerationRequest(prompt, sampling, StoppingParams(max_new_tokens=max_new, ignore_eos_token=True))


def _tokens(out):
    return [t.id for t in out.tokens]


def _check_isolated(results, expected, bad: int, message: str) -> None:
    assert isinstance(results[bad], ErrorOutput) and message in results[bad].message
    assert results[bad].error_type == "incomplete_generation"
    for i, want in expected.items():
        if i != bad:
            assert isinstance(results[i], FinalOutput) and _tokens(results[i]) == want
    record("faults", injected=1, requests_lost=0, other_requests_completed=len(expected) - 1)


@pytest.fixture(scope="module")
def expected(checkpoint):
    results = _run(_engine(checkpoint), [_request(p) for p in PROMPTS])
    return {i: _tokens(out) for i, out in results.items()}


def test_detokenizer_failure_in_one_request(checkpoint, expected, monkeypatch):
    engine = _engine(checkpoint)
    original = engine.add_request

    def add(request, sink, **kw):
        seq_id = original(request, sink, **kw)
        if request.prompt_ids == PROMPTS[1]:
            live = engine._live[seq_id]
            step, count = live.detok.step, [0]

            def failing(token):
                count[0] += 1
                if count[0] == 5:
                    raise RuntimeError("injected detokenizer fault")
                return step(token)

            live.detok.step = failing
        return seq_id

    engine.add_request = add
    results = _run(engine, [_request(p) for p in PROMPTS])
    _check_isolated(results, expected, 1, "injected detokenizer fault")
    assert engine.cache_free_slots() == engine.cache_total_slots()


def test_sampling_failure_in_one_request(checkpoint, expected, monkeypatch):
    real = llm_engine_module.sample

    def sample(logits, rows):
        if any(r.seed == 666 for r in rows):
            raise RuntimeError("injected sampling fault")
        return real(logits, rows)

    monkeypatch.setattr(llm_engine_module, "sample", sample)
    engine = _engine(checkpoint)
    reqs = [_request(p) for p in PROMPTS]
    reqs[2] = _request(PROMPTS[2], seed=666)
    results = _run(engine, reqs)
    _check_isolated(results, expected, 2, "injected sampling fault")


def test_forward_failure_of_one_request(checkpoint, expected, tmp_path):
    """A LoRA whose tensors no longer fit (as if corrupted in memory) makes the batched forward pass fail; the
    engine finds the request at fault by running each alone, fails it, and the others go on."""
    from gorgon.adapters.lora import load_lora_adapter
    from gorgon.bench.lora import write_random_lora

    engine = _engine(checkpoint)
    cfg = engine.runner.model.config
    lora = load_lora_adapter(
        write_random_lora(tmp_path / "l", cfg, 4), cfg, dtype=torch.float32, device="cpu"
    )
    w = lora.layers[0]["q_proj"]
    w.a = torch.zeros(4, cfg.hidden_size + 3)  # broken: the kernel (or fallback) refuses it
    results = _run(engine, [_request(p) for p in PROMPTS], lora={3: lora})
    _check_isolated(results, expected, 3, "model step failed")
    assert engine.cache_free_slots() == engine.cache_total_slots()


def test_deadline(checkpoint, monkeypatch):
    engine = _engine(checkpoint, EngineConfig(max_input_length=64, max_total_tokens=160, request_timeout=0.5))
    run = engine.runner.run

    def slow(plan):
        import time

        time.sleep(0.02)
        return run(plan)

    monkeypatch.setattr(engine.runner, "run", slow)
    results = _run(engine, [_request(PROMPTS[0], max_new=120), _request(PROMPTS[1], max_new=3)])
    assert isinstance(results[0], ErrorOutput) and "deadline" in results[0].message
    assert isinstance(results[1], FinalOutput) and results[1].generated_tokens == 3
    assert engine.cache_free_slots() == engine.cache_total_slots()
    record("faults", injected=1, deadlines_enforced=1, requests_lost=0)
