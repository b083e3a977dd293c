"""The OpenAI routes through the real `openai` client against a live uvicorn server (fake engine)."""

from __future__ import annotations

import httpx
import openai
import pytest
from fake_engine import FAIL_MIDWAY


@pytest.fixture
def oai(live_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_completion(oai, fake_engine):
    r = oai.completions.create(model="", prompt="Hello", max_tokens=5)
    assert r.choices[0].text == fake_engine.expected_text(5)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(fake_engine.requests[0].prompt_ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        n_prompt,
        5,
        n_prompt + 5,
    )
    assert r.model == "fake/tiny-model" and r.object == "text_completion" and r.id.startswith("cmpl-")
    assert fake_engine.requests[0].adapter_id is None
    raw = oai.completions.with_raw_response.create(model="org/lora", prompt="Hello", max_tokens=2)
    assert raw.headers["x-generated-tokens"] == "2" and raw.headers["x-adapter-id"] == "org/lora"


def test_completion_stop_is_excluded(oai):
    r = oai.completions.create(model="", prompt="Hello", max_tokens=30, stop=["fox"])
    assert r.choices[0].text == " The quick brown " and r.choices[0].finish_reason == "stop"
    r = oai.completions.create(model="", prompt="Hello", max_tokens=30, stop="fox", stream=True)
    chunks = list(r)
    assert "".join(c.choices[0].text for c in chunks) == " The quick brown "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completion_stream(oai, fake_engine):
    stream = oai.completions.create(
        model="", prompt="Hello", max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == fake_engine.expected_text(6)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_completion_echo_and_logprobs(oai, fake_engine):
    r = oai.completions.create(model="", prompt="Hello", max_tokens=3, echo=True, logprobs=2)
    expected = fake_engine.expected_text(3)
    assert r.choices[0].text == "Hello" + expected
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == expected and len(lp.token_logprobs) == 3
    assert all(len(top) == 2 for top in lp.top_logprobs) and lp.text_offset[0] == len("Hello")
    assert fake_engine.requests[0].top_n_tokens == 2


def test_chat(oai, fake_engine, tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = oai.chat.completions.create(model="", messages=messages, max_tokens=4)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == fake_engine.expected_text(4)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    prompt = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert fake_engine.requests[0].prompt_ids == tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]


def chat_stream_text(oai, **kwargs) -> tuple[str, list]:
    stream = oai.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Hi"}], stream=True, **kwargs
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks


def test_chat_stream(oai, fake_engine):
    text, chunks = chat_stream_text(oai, max_tokens=30, stop=["quick"])
    assert text == " The " and chunks[-1].choices[0].finish_reason == "stop"
    # "qu" may begin the stop sequence: held back, then sent when generation ends for another reason.
    text, chunks = chat_stream_text(oai, max_tokens=5, stop=["quick"])
    assert (
        text == fake_engine.expected_text(5) == " The qu" and chunks[-1].choices[0].finish_reason == "length"
    )


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(
        model="", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 for t in content)


def test_model_is_the_adapter(oai, fake_engine):
    oai.completions.create(model="org/my-lora", prompt="Hi", max_tokens=1)
    oai.completions.create(model="fake/tiny-model", prompt="Hi", max_tokens=1)
    oai.chat.completions.create(model="org/other", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert [r.adapter_id for r in fake_engine.requests] == ["org/my-lora", None, "org/other"]


def test_lorax_extra_fields(oai, fake_engine):
    oai.completions.create(
        model="",
        prompt="Hi",
        max_tokens=2,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        frequency_penalty=0.1,
        extra_body={
            "top_k": 4,
            "repetition_penalty": 1.3,
            "ignore_eos_token": True,
            "adapter_source": "local",
        },
    )
    req = fake_engine.requests[0]
    sp = req.sampling
    assert sp.do_sample and (sp.temperature, sp.top_p, sp.top_k, sp.seed) == (0.5, 0.9, 4, 7)
    assert (sp.repetition_penalty, sp.frequency_penalty) == (1.3, 0.1) and req.stopping.ignore_eos_token


def test_errors(oai, fake_engine):
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.completions.create(model="", prompt="Hi", temperature=-1)
    assert e.value.response.json() == {
        "error": "Input validation error: `temperature` must be non-negative",
        "error_type": "validation",
    }
    with pytest.raises(openai.UnprocessableEntityError) as e:
        oai.chat.completions.create(model="", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert "`n` > 1 is not supported" in e.value.body  # the client exposes the `error` field as the body
    fake_engine.in_flight = fake_engine.config.max_concurrent_requests
    with pytest.raises(openai.RateLimitError):
        oai.completions.create(model="", prompt="Hi", max_tokens=2)
    fake_engine.in_flight = 0
    with pytest.raises(openai.APIError):
        list(oai.completions.create(model="", prompt=f"Hi {FAIL_MIDWAY}", max_tokens=5, stream=True))


def test_openai_sse_format(live_url):
    r = httpx.post(f"{live_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
