"""The synchronous engine end to end on a tiny random Llama: continuous batching, stops, seeds, logprobs."""

from __future__ import annotations

import pytest
import torch
from helpers import gorgon_from_hf, tiny_hf_model

from gorgon.config import EngineConfig
from gorgon.engine.llm_engine import LLMEngine
from gorgon.engine.request import (
    ErrorOutput,
    FinalOutput,
    GenerationRequest,
    SamplingParams,
    StoppingParams,
    TokenOutput,
)

CONFIG = EngineConfig(max_input_length=200, max_total_tokens=400, max_batch_total_tokens=4000)


@pytest.fixture(scope="module")
def hf_model(tiny_tokenizer):
    return tiny_hf_model(
        "llama", vocab_size=len(tiny_tokenizer), max_position_embeddings=1024, eos_token_id=1
    )


def make_engine(hf_model, tokenizer, dtype=torch.float32, config=CONFIG, eos=frozenset({1})) -> LLMEngine:
    model = gorgon_from_hf(hf_model, dtype)
    return LLMEngine(model, tokenizer, config, dtype, torch.device("cpu"), set(eos))


def request(prompt, max_new=20, sampling=None, stop=(), ignore_eos=True, **kw) -> GenerationRequest:
    return GenerationRequest(
        list(prompt),
        sampling or SamplingParams(),
        StoppingParams(max_new_tokens=max_new, stop_sequences=tuple(stop), ignore_eos_token=ignore_eos),
        **kw,
    )


def run(engine, requests, arrivals=None):
    """Add requests (request i after arrivals[i] steps), step until all finish; return outputs per request."""
    arrivals = arrivals or [0] * len(requests)
    outputs: list[list] = [[] for _ in requests]
    step = 0
    added = set()
    while len(added) < len(requests) or engine.has_work():
        for i, r in enumerate(requests):
            if i not in added and arrivals[i] <= step:
                engine.add_request(r, outputs[i].append)
                added.add(i)
        engine.step()
        step += 1
    return outputs


def final(outs) -> FinalOutput:
    assert isinstance(outs[-1], FinalOutput), outs[-1]
    return outs[-1]


def prompts(n, seed=0, lo=3, hi=60):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 300, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def test_continuous_batching_matches_hf_greedy(hf_model, tiny_tokenizer):
    engine = make_engine(hf_model, tiny_tokenizer)
    ps = prompts(5)
    outs = run(engine, [request(p, max_new=24) for p in ps], arrivals=[0, 0, 3, 7, 8])
    for p, o in zip(ps, outs):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert [t.id for t in final(o).tokens] == ref[0, len(p) :].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_do_not_depend_on_batch_or_prefill_budget(hf_model, tiny_tokenizer, dtype):
    ps = prompts(6, seed=1, lo=20, hi=150)
    sampled = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, seed=7, repetition_penalty=1.2)
    reqs = [request(p, max_new=16, sampling=sampled if i % 2 else None) for i, p in enumerate(ps)]
    alone = [run(make_engine(hf_model, tiny_tokenizer, dtype), [r])[0] for r in reqs]
    small_budget = EngineConfig(
        max_input_length=200, max_total_tokens=400, max_batch_total_tokens=4000, max_batch_prefill_tokens=37
    )
    for config in (CONFIG, small_budget):
        together = run(
            make_engine(hf_model, tiny_tokenizer, dtype, config), reqs, arrivals=[0, 1, 1, 2, 5, 5]
        )
        for a, b in zip(alone, together):
            assert [(t.id, t.logprob) for t in final(a).tokens] == [
                (t.id, t.logprob) for t in final(b).tokens
            ]


def test_length_and_stream_shape(hf_model, tiny_tokenizer):
    engine = make_engine(hf_model, tiny_tokenizer)
    (outs,) = run(engine, [request(prompts(1)[0], max_new=9)])
    tokens = [o for o in outs if isinstance(o, TokenOutput)]
    f = final(outs)
    assert len(tokens) == 9 and f.generated_tokens == 9 and f.finish_reason == "length"
    assert [t.finish_reason for t in tokens] == [None] * 8 + ["length"]
    assert f.seed is None and f.skipped_tokens == 0


def test_eos_stops_unless_ignored(hf_model, tiny_tokenizer):
    p = prompts(1, seed=3)[0]
    (free,) = run(make_engine(hf_model, tiny_tokenizer), [request(p, max_new=12)])
    third = final(free).tokens[2].id
    engine = make_engine(hf_model, tiny_tokenizer, eos={third})
    (stopped,) = run(engine, [request(p, max_new=12, ignore_eos=False)])
    assert final(stopped).finish_reason == "eos_token" and final(stopped).generated_tokens == 3
    assert final(stopped).tokens[-1].special
    (ignored,) = run(
        make_engine(hf_model, tiny_tokenizer, eos={third}), [request(p, max_new=12, ignore_eos=True)]
    )
    assert final(ignored).generated_tokens == 12


def test_stop_sequence_cuts_after_the_stop(hf_model, tiny_tokenizer):
    p = prompts(1, seed=4)[0]
    (free,) = run(make_engine(hf_model, tiny_tokenizer), [request(p, max_new=30)])
    text = tiny_tokenizer.decode([t.id for t in final(free).tokens], skip_special_tokens=True)
    stop = text[10:13]
    assert stop.strip(), "the random model should produce printable text here"
    (outs,) = run(make_engine(hf_model, tiny_tokenizer), [request(p, max_new=30, stop=[stop])])
    f = final(outs)
    assert f.finish_reason == "stop_sequence"
    assert f.generated_text.endswith(stop) and f.generated_text == text[: text.index(stop) + len(stop)]


def test_seeded_sampling_is_reproducible(hf_model, tiny_tokenizer):
    p = prompts(1, seed=5)[0]

    def sample(seed):
        sp = SamplingParams(do_sample=True, temperature=1.3, top_k=50, seed=seed)
        (outs,) = run(make_engine(hf_model, tiny_tokenizer), [request(p, max_new=20, sampling=sp)])
        return final(outs)

    a, b, c = sample(11), sample(11), sample(12)
    assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
    assert [t.id for t in a.tokens] != [t.id for t in c.tokens]
    assert a.seed == 11


def test_unseeded_sampling_reports_its_seed(hf_model, tiny_tokenizer):
    p = prompts(1, seed=6)[0]
    sp = SamplingParams(do_sample=True, temperature=1.0)
    (outs,) = run(make_engine(hf_model, tiny_tokenizer), [request(p, max_new=8, sampling=sp)])
    seed = final(outs).seed
    replay = SamplingParams(do_sample=True, temperature=1.0, seed=seed)
    (again,) = run(make_engine(hf_model, tiny_tokenizer), [request(p, max_new=8, sampling=replay)])
    assert [t.id for t in final(outs).tokens] == [t.id for t in final(again).tokens]


def test_prefill_logprobs_match_hf(hf_model, tiny_tokenizer):
    p = prompts(1, seed=7, lo=30, hi=40)[0]
    budget = EngineConfig(
        max_input_length=200, max_total_tokens=400, max_batch_total_tokens=4000, max_batch_prefill_tokens=16
    )
    engine = make_engine(hf_model, tiny_tokenizer, config=budget)  # chunked prefill
    (outs,) = run(engine, [request(p, max_new=2, prefill_logprobs=True)])
    prefill = final(outs).prefill
    assert [t.id for t in prefill] == p and prefill[0].logprob is None
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([p])).logits[0].float(), -1)
    ref = [logprobs[i, p[i + 1]].item() for i in range(len(p) - 1)]
    assert [t.logprob for t in prefill[1:]] == pytest.approx(ref, abs=1e-4)


def test_token_logprobs_and_alternatives(hf_model, tiny_tokenizer):
    p = prompts(1, seed=8)[0]
    (outs,) = run(make_engine(hf_model, tiny_tokenizer), [request(p, max_new=3, top_n_tokens=4)])
    first = final(outs).tokens[0]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([p])).logits[0, -1].float(), -1)
    assert first.logprob == pytest.approx(logprobs.max().item(), abs=1e-4)
    assert len(first.alternatives) == 4
    assert [a.id for a in first.alternatives] == logprobs.topk(4).indices.tolist()


def test_abort_frees_the_kv_slots(hf_model, tiny_tokenizer):
    engine = make_engine(hf_model, tiny_tokenizer)
    free_before = engine.scheduler.allocator.num_free
    outs: list = []
    seq_id = engine.add_request(request(prompts(1)[0], max_new=50), outs.append)
    other: list = []
    engine.add_request(request(prompts(1, seed=9)[0], max_new=5), other.append)
    for _ in range(3):
        engine.step()
    engine.abort(seq_id)
    while engine.has_work():
        engine.step()
    assert not any(isinstance(o, FinalOutput) for o in outs)
    assert isinstance(other[-1], FinalOutput) and other[-1].generated_tokens == 5
    assert engine.scheduler.allocator.num_free == free_before


def test_waiting_requests_start_when_kv_frees(hf_model, tiny_tokenizer):
    tight = EngineConfig(max_input_length=100, max_total_tokens=128, max_batch_total_tokens=130)
    engine = make_engine(hf_model, tiny_tokenizer, config=tight)
    outs = run(engine, [request(prompts(1, seed=s)[0], max_new=60) for s in range(3)])
    assert all(final(o).generated_tokens == 60 for o in outs)


def test_failed_step_fails_its_requests_not_the_engine(hf_model, tiny_tokenizer, monkeypatch):
    engine = make_engine(hf_model, tiny_tokenizer)
    outs: list = []
    engine.add_request(request(prompts(1)[0], max_new=4), outs.append)
    real_run = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda plan: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.step()
    assert isinstance(outs[-1], ErrorOutput) and "boom" in outs[-1].message
    monkeypatch.setattr(engine.runner, "run", real_run)
    (ok,) = run(engine, [request(prompts(1)[0], max_new=4)])
    assert final(ok).generated_tokens == 4


def test_plain_blas_mode_still_matches_hf(hf_model, tiny_tokenizer):
    """batch_invariant=False (used by `gorgon bench` to price invariance) is still a correct engine."""
    config = EngineConfig(
        max_input_length=200, max_total_tokens=400, max_batch_total_tokens=4000, batch_invariant=False
    )
    engine = make_engine(hf_model, tiny_tokenizer, config=config)
    p = prompts(1, seed=10)[0]
    (outs,) = run(engine, [request(p, max_new=12)])
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert [t.id for t in final(outs).tokens] == ref[0, len(p) :].tolist()
