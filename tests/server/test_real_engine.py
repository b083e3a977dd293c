"""The server on the real engine (tiny random Llama, CPU): SSE, OpenAI client, best_of and disconnects.

The model is random, so the tests check consistency instead of fixed text: greedy decoding is deterministic,
so every route must answer the same text for the same prompt, streamed or not.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from helpers import wait_until

GREEDY = {"max_new_tokens": 16, "ignore_eos_token": True}


@pytest.fixture
def oai(real_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{real_url}/v1", api_key="unused", max_retries=0, timeout=60)


def generate(url: str, inputs: str = "Hello world", **params) -> httpx.Response:
    r = httpx.post(f"{url}/generate", json={"inputs": inputs, "parameters": {**GREEDY, **params}}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def idle(engine) -> bool:
    stats = engine.stats()
    return stats.running == 0 and stats.queue_length == 0


def test_generate_and_sse_agree(real_url, real_engine):
    r = generate(real_url, details=True, decoder_input_details=True)
    body = r.json()
    d = body["details"]
    assert d["generated_tokens"] == 16 and d["finish_reason"] == "length" and d["seed"] is None
    assert d["prompt_tokens"] == len(real_engine.tokenizer("Hello world")["input_ids"]) == len(d["prefill"])
    assert d["prefill"][0]["logprob"] is None and all(
        isinstance(p["logprob"], float) for p in d["prefill"][1:]
    )
    # Token texts add up to the text, except bytes of a character left incomplete at the end (random model).
    assert body["generated_text"].startswith("".join(t["text"] for t in d["tokens"]))
    assert r.headers["x-generated-tokens"] == "16" and r.headers["x-model-id"] == real_engine.model_id

    s = httpx.post(
        f"{real_url}/generate_stream",
        json={"inputs": "Hello world", "parameters": {**GREEDY, "details": True}},
        timeout=60,
    )
    assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
    raw = s.text.split("\n\n")
    assert raw[-1] == "" and all(e.startswith('data:{"token":') for e in raw[:-1])
    events = [httpx.Response(200, content=e[len("data:") :]).json() for e in raw[:-1]]
    assert len(events) == 16
    assert [e["token"]["id"] for e in events] == [t["id"] for t in d["tokens"]]
    assert events[-1]["generated_text"] == body["generated_text"]
    assert events[-1]["details"]["generated_tokens"] == 16
    assert all(e["generated_text"] is None for e in events[:-1])


def test_openai_matches_lorax(oai, real_url):
    expected = generate(real_url).json()["generated_text"]
    extra = {"ignore_eos_token": True}
    r = oai.completions.create(model="", prompt="Hello world", max_tokens=16, extra_body=extra)
    assert r.choices[0].text == expected and r.usage.completion_tokens == 16
    chunks = list(
        oai.completions.create(model="", prompt="Hello world", max_tokens=16, stream=True, extra_body=extra)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_stop_sequence_excluded(oai, real_url):
    full = generate(real_url).json()["generated_text"]
    stop = next(
        ch for ch in full[3:] if ch.isascii() and ch.isprintable()
    )  # some text the model does produce
    cut = full.find(stop)
    lorax = generate(real_url, stop=[stop], details=True).json()
    assert (
        lorax["generated_text"] == full[: cut + len(stop)]
        and lorax["details"]["finish_reason"] == "stop_sequence"
    )
    r = oai.completions.create(
        model="", prompt="Hello world", max_tokens=16, stop=[stop], extra_body={"ignore_eos_token": True}
    )
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"


def test_openai_chat(oai, real_engine):
    messages = [{"role": "user", "content": "Hi there"}]
    kw = {"model": "", "messages": messages, "max_tokens": 8, "extra_body": {"ignore_eos_token": True}}
    r = oai.chat.completions.create(**kw)
    prompt = real_engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(real_engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens == 8
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == 8


def test_best_of(real_url):
    d = generate(real_url, max_new_tokens=6, best_of=3, do_sample=True, details=True).json()["details"]
    others = d["best_of_sequences"]
    assert len(others) == 2 and len({d["seed"], *(o["seed"] for o in others)}) == 3

    def score(tokens):
        return sum(t["logprob"] for t in tokens)

    assert all(score(d["tokens"]) >= score(o["tokens"]) for o in others)


LONG = {"max_new_tokens": 3000, "ignore_eos_token": True}  # many seconds of CPU decoding


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate_stream", {"inputs": "Hi", "parameters": LONG}),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3000,
                "ignore_eos_token": True,
                "stream": True,
            },
        ),
    ],
)
def test_stream_disconnect_aborts(real_url, real_engine, path, body):
    before = real_engine.stats().generated_tokens
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{real_url}{path}", json=body) as r:
        assert r.status_code == 200
        assert next(r.iter_lines()).startswith("data:")
    assert wait_until(lambda: idle(real_engine), timeout=5)
    assert real_engine.stats().generated_tokens - before < 3000


def test_request_disconnect_aborts(real_url, real_engine):
    before = real_engine.stats().generated_tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{real_url}/generate", json={"inputs": "Hi", "parameters": LONG}, timeout=0.5)
    assert wait_until(lambda: idle(real_engine), timeout=5)
    assert real_engine.stats().generated_tokens - before < 3000


def test_unusable_adapter_fails_the_request_alone(real_url, tmp_path):
    body = {
        "inputs": "Hello",
        "parameters": {"max_new_tokens": 3, "adapter_id": str(tmp_path), "adapter_source": "local"},
    }
    r = httpx.post(f"{real_url}/generate", json=body, timeout=30)
    assert r.status_code == 424
    assert r.json()["error_type"] == "generation"
    assert r.json()["error"].startswith("Request failed during generation:")
    ok = httpx.post(
        f"{real_url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=30
    )
    assert ok.status_code == 200
