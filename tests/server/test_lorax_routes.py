"""LoRAX routes on the fake engine: `/generate`, `POST /`, `/generate_stream`, details, headers, best_of, errors."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from fake_engine import FAIL_MIDWAY, MISSING_ADAPTER, FakeEngine
from fastapi.testclient import TestClient
from helpers import SMALL_CONFIG, serve

from gorgon.engine.request import FinalOutput, TokenOutput
from gorgon.server.app import create_app
from gorgon.server.generation import EngineStream
from gorgon.server.lorax_routes import lorax_events
from gorgon.server.metrics import ServerMetrics
from gorgon.server.schemas import Parameters
from gorgon.server.validation import validate_request


def parse_sse(text: str) -> list[dict]:
    """LoRAX SSE: `data:{json}` events separated by blank lines, no space after the colon."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data:{") for e in events), events
    return [json.loads(e[len("data:") :]) for e in events]


def test_generate_plain_and_headers(client, fake_engine):
    r = client.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5}})
    assert r.status_code == 200
    assert r.json() == {"generated_text": fake_engine.expected_text(5)}  # no `details` key at all
    n_prompt = len(fake_engine.requests[0].prompt_ids)
    assert r.headers["x-prompt-tokens"] == str(n_prompt)
    assert r.headers["x-generated-tokens"] == "5"
    assert r.headers["x-skipped-tokens"] == "0"
    assert r.headers["x-total-tokens"] == str(n_prompt + 5)
    assert r.headers["x-model-id"] == "fake/tiny-model"
    assert r.headers["x-adapter-id"] == "fake/tiny-model"


def test_generate_details(tiny_tokenizer):
    engine = FakeEngine(tiny_tokenizer, skip_every=3)
    with TestClient(create_app(engine)) as c:
        r = c.post(
            "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 6, "details": True}}
        )
    body = r.json()
    d = body["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 6 and d["seed"] is None
    assert d["prompt_tokens"] == len(engine.requests[0].prompt_ids)
    assert d["prefill"] == [] and "best_of_sequences" not in d
    assert [t["skipped"] for t in d["tokens"]] == [False, True, True, False, True, True]
    assert d["skipped_tokens"] == 4 and r.headers["x-skipped-tokens"] == "4"
    assert "".join(t["text"] for t in d["tokens"]) == body["generated_text"]
    for t, tid in zip(d["tokens"], engine.script_ids):
        assert set(t) == {"id", "text", "logprob", "special", "skipped"} and t["id"] == tid
        assert isinstance(t["logprob"], float) and t["special"] is False


def test_compat_route_returns_a_list(client, fake_engine):
    nulls = {
        k: None
        for k in ("adapter_id", "best_of", "temperature", "top_k", "top_p", "typical_p", "seed", "truncate")
    }
    params = {
        **nulls,
        "max_new_tokens": 4,
        "details": True,
        "do_sample": False,
        "stop": [],
        "watermark": False,
    }
    r = client.post("/", json={"inputs": "Hello", "parameters": params, "stream": False})
    assert r.status_code == 200
    body = r.json()
    assert isinstance(body, list) and len(body) == 1
    assert body[0]["generated_text"] == fake_engine.expected_text(4)
    assert body[0]["details"]["generated_tokens"] == 4
    assert r.headers["x-generated-tokens"] == "4"


def test_compat_route_streams(client, fake_engine):
    r = client.post("/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert len(events) == 3 and events[-1]["generated_text"] == fake_engine.expected_text(3)


def test_sse_format(tiny_tokenizer):
    engine = FakeEngine(tiny_tokenizer, skip_every=2)
    with TestClient(create_app(engine)) as c:
        r = c.post(
            "/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 5, "details": True}}
        )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-model-id"] == "fake/tiny-model"
    events = parse_sse(r.text)
    assert len(events) == 5
    for e in events[:-1]:
        assert e["generated_text"] is None and e["details"] is None
        assert set(e["token"]) == {"id", "text", "logprob", "special", "skipped"}
    last = events[-1]
    assert last["generated_text"] == engine.expected_text(5) == "".join(e["token"]["text"] for e in events)
    assert last["details"] == {
        "finish_reason": "length",
        "prompt_tokens": len(engine.requests[0].prompt_ids),
        "generated_tokens": 5,
        "skipped_tokens": 2,
        "seed": None,
    }
    assert [e["token"]["skipped"] for e in events] == [False, True, False, True, False]


def test_stream_without_details(client):
    events = parse_sse(
        client.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).text
    )
    assert events[-1]["details"] is None and events[-1]["generated_text"] is not None


def test_return_full_text(client, fake_engine):
    params = {"max_new_tokens": 3, "return_full_text": True}
    r = client.post("/generate", json={"inputs": "Hello", "parameters": params})
    assert r.json()["generated_text"] == "Hello" + fake_engine.expected_text(3)
    events = parse_sse(client.post("/generate_stream", json={"inputs": "Hello", "parameters": params}).text)
    assert events[-1]["generated_text"] == "Hello" + fake_engine.expected_text(3)


def test_decoder_input_details_and_alternatives(client, fake_engine):
    params = {"max_new_tokens": 3, "decoder_input_details": True, "return_k_alternatives": 2}
    d = client.post("/generate", json={"inputs": "Hello", "parameters": params}).json()["details"]
    prompt = fake_engine.requests[0].prompt_ids
    assert fake_engine.requests[0].prefill_logprobs and fake_engine.requests[0].top_n_tokens == 2
    assert [p["id"] for p in d["prefill"]] == prompt
    assert d["prefill"][0]["logprob"] is None and all(p["logprob"] is not None for p in d["prefill"][1:])
    for t in d["tokens"]:
        assert len(t["alternative_tokens"]) == 2
        assert set(t["alternative_tokens"][0]) == {"id", "text", "logprob"}


def test_stop_sequence_is_kept(client, fake_engine):
    params = {"max_new_tokens": 30, "stop": ["fox"], "details": True}
    body = client.post("/generate", json={"inputs": "Hello", "parameters": params}).json()
    assert body["generated_text"] == " The quick brown fox"
    assert body["details"]["finish_reason"] == "stop_sequence"


def test_eos(tiny_tokenizer):
    engine = FakeEngine(tiny_tokenizer, eos_after=2)
    with TestClient(create_app(engine)) as c:
        d = c.post(
            "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 9, "details": True}}
        ).json()
    assert d["details"]["finish_reason"] == "eos_token" and d["details"]["generated_tokens"] == 3
    assert d["details"]["tokens"][-1]["special"] is True


def test_best_of(client, fake_engine):
    params = {"max_new_tokens": 4, "best_of": 3, "do_sample": True, "details": True}
    r = client.post("/generate", json={"inputs": "Hello", "parameters": params})
    assert r.status_code == 200
    d = r.json()["details"]
    seeds = [req.sampling.seed for req in fake_engine.requests]
    assert len(seeds) == 3 and len(set(seeds)) == 3 and all(s is not None for s in seeds)
    assert len({req.request_id for req in fake_engine.requests}) == 3
    others = d["best_of_sequences"]
    assert len(others) == 2
    assert {d["seed"], *(o["seed"] for o in others)} == set(seeds)

    def score(tokens):
        return sum(t["logprob"] for t in tokens)

    assert all(score(d["tokens"]) >= score(o["tokens"]) for o in others)
    # The fake engine's answer depends on the seed: the chosen text is the chosen seed's.
    offset = d["seed"] % len(fake_engine.script_ids)
    assert r.json()["generated_text"] == fake_engine.expected_text(4, offset)
    for o in others:
        assert set(o) == {
            "generated_text",
            "finish_reason",
            "generated_tokens",
            "skipped_tokens",
            "seed",
            "prefill",
            "tokens",
        }


def test_adapter_id_is_passed_to_the_engine(client, fake_engine):
    r = client.post(
        "/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "org/my-lora", "max_new_tokens": 1}}
    )
    assert r.status_code == 200 and r.headers["x-adapter-id"] == "org/my-lora"
    assert fake_engine.requests[0].adapter_id == "org/my-lora"


def test_overloaded(client, fake_engine):
    fake_engine.in_flight = fake_engine.config.max_concurrent_requests
    expected = {"error": "Model is overloaded", "error_type": "overloaded"}
    for path in ("/generate", "/generate_stream", "/v1/completions"):
        body = {"inputs": "Hi", "prompt": "Hi", "parameters": {"max_new_tokens": 2}}
        r = client.post(path, json=body)
        assert r.status_code == 429 and r.json() == expected, path


def test_generation_error(client):
    params = {"adapter_id": MISSING_ADAPTER, "max_new_tokens": 2}
    for path in ("/generate", "/generate_stream", "/"):
        r = client.post(path, json={"inputs": "Hi", "parameters": params})
        assert r.status_code == 424
        assert r.json()["error_type"] == "generation"
        assert r.json()["error"].startswith("Request failed during generation: ")


def test_failure_during_generation(client):
    body = {"inputs": f"Hi {FAIL_MIDWAY}", "parameters": {"max_new_tokens": 6}}
    r = client.post("/generate", json=body)
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
    events = parse_sse(client.post("/generate_stream", json=body).text)
    assert len(events) == 3 and all("token" in e for e in events[:2])
    assert events[-1] == {
        "error": "Request failed during generation: fake failure",
        "error_type": "generation",
    }


def test_stream_ends_on_stop_and_eos(client, tiny_tokenizer):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 30, "stop": ["fox"], "details": True}}
    events = parse_sse(client.post("/generate_stream", json=body).text)
    assert (
        "".join(e["token"]["text"] for e in events) == events[-1]["generated_text"] == " The quick brown fox"
    )
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert all(e["generated_text"] is None for e in events[:-1])
    engine = FakeEngine(tiny_tokenizer, eos_after=3)
    with TestClient(create_app(engine)) as c:
        events = parse_sse(
            c.post("/generate_stream", json={"inputs": "Hi", "parameters": {"details": True}}).text
        )
    assert len(events) == 4 and events[-1]["token"]["special"] is True
    assert events[-1]["details"]["finish_reason"] == "eos_token"


def test_stream_sends_tokens_without_waiting_for_the_next(tiny_tokenizer):
    # The fake engine takes DELAY per token: a token held until the next one would arrive DELAY late.
    delay = 1.0
    engine = FakeEngine(tiny_tokenizer, token_delay=delay)
    with serve(create_app(engine)) as url:
        started = time.monotonic()
        body = {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=10) as r:
            lines = (line for line in r.iter_lines() if line)
            next(lines)
            first = time.monotonic() - started
            rest = list(lines)
    assert first < 1.6 * delay, first
    assert len(rest) == 1 and json.loads(rest[-1][len("data:") :])["generated_text"] is not None


def run_events(items, v) -> list[dict]:
    async def outputs():
        for item in items[1:]:
            yield item

    async def collect():
        stream = EngineStream(outputs(), items[0])
        return [json.loads(e[len("data:") :]) async for e in lorax_events(stream, v, ServerMetrics(None))]

    return asyncio.run(collect())


def test_stream_end_not_foreseen(tiny_tokenizer):
    # An engine that does not mark its last token still gets its text and details out.
    v = validate_request(
        "Hi",
        Parameters(details=True),
        tokenizer=tiny_tokenizer,
        config=SMALL_CONFIG,
        model_id="m",
        stream=True,
    )
    tokens = [TokenOutput(id=10 + i, text=f"t{i}", logprob=-1.0, special=False) for i in range(2)]
    final = FinalOutput("t0t1", "length", 2, 2, 0, None)
    events = run_events([*tokens, final], v)
    assert [e["token"]["text"] for e in events] == ["t0", "t1", ""]
    assert events[-1]["token"]["special"] is True and events[-1]["generated_text"] == "t0t1"
    assert events[-1]["details"]["generated_tokens"] == 2
    # The token marked last waits for the final output, and carries it.
    eos = TokenOutput(id=2, text="", logprob=-1.0, special=True, finish_reason="eos_token")
    events = run_events([tokens[0], eos, FinalOutput("t0", "eos_token", 2, 2, 0, None)], v)
    assert len(events) == 2 and events[-1]["token"]["id"] == 2 and events[-1]["generated_text"] == "t0"
