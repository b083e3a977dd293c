"""Every validation rule of the LoRAX API, on `validate_request` directly and through HTTP."""

from __future__ import annotations

import json

import pytest
from helpers import SMALL_CONFIG

from gorgon.errors import ValidationError
from gorgon.server.schemas import Parameters
from gorgon.server.validation import validate_request

MODEL_ID = "fake/tiny-model"


def check(tokenizer, inputs="Hello world", stream=False, **params):
    return validate_request(
        inputs,
        Parameters(**params),
        tokenizer=tokenizer,
        config=SMALL_CONFIG,
        model_id=MODEL_ID,
        stream=stream,
    )


@pytest.mark.parametrize(
    "params, message",
    [
        ({"temperature": -0.1}, "`temperature` must be non-negative"),
        ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"presence_penalty": -2.1}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 0.0}, "`top_p` must be > 0.0 and <= 1.0"),
        ({"top_p": 1.5}, "`top_p` must be > 0.0 and <= 1.0"),
        ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d"]}, "`stop` supports up to 3 stop sequences. Given: 4"),
        ({"stop": [""]}, "`stop` sequences cannot be empty"),
        ({"best_of": 0}, "`best_of` must be > 0 and <= 4. Given: 0"),
        ({"best_of": 5, "do_sample": True}, "`best_of` must be > 0 and <= 4. Given: 5"),
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "temperature": 0.0}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        ({"seed": -1}, "`seed` must be a non-negative 64-bit integer"),
        ({"truncate": 0}, "`truncate` must be strictly positive"),
        ({"truncate": 65}, "`truncate` must be strictly positive and at most 64. Given: 65"),
        ({"return_k_alternatives": 11}, "`return_k_alternatives` must be >= 0 and <= 10"),
        (
            {"max_new_tokens": 200},
            "`inputs` tokens + `max_new_tokens` must be <= 128. Given: 6 `inputs` tokens and 200",
        ),
        ({"adapter_source": "ftp"}, "`adapter_source` must be one of hub, local, s3, pbase"),
        ({"watermark": True}, "`watermark` is not supported"),
        ({"response_format": {"type": "json_object"}}, "`response_format` is not supported"),
        ({"merged_adapters": {"ids": ["a"]}}, "`merged_adapters` is not supported"),
    ],
)
def test_rule(tiny_tokenizer, params, message):
    with pytest.raises(ValidationError) as e:
        check(tiny_tokenizer, **params)
    assert e.value.message.startswith("Input validation error: ")
    assert message in e.value.message


def test_stream_rules(tiny_tokenizer):
    with pytest.raises(ValidationError, match="not supported when streaming"):
        check(tiny_tokenizer, stream=True, best_of=2, do_sample=True)
    with pytest.raises(
        ValidationError, match="`decoder_input_details` == true is not supported when streaming"
    ):
        check(tiny_tokenizer, stream=True, decoder_input_details=True)


def test_empty_inputs(tiny_tokenizer):
    with pytest.raises(ValidationError, match="`inputs` cannot be empty"):
        check(tiny_tokenizer, inputs="")


def test_input_length_and_truncate(tiny_tokenizer):
    long = "The quick brown fox jumps over the lazy dog. " * 20
    n = len(tiny_tokenizer(long)["input_ids"])
    assert n > SMALL_CONFIG.max_input_length
    with pytest.raises(ValidationError, match=f"`inputs` must have at most 64 tokens. Given: {n} tokens"):
        check(tiny_tokenizer, inputs=long)
    v = check(tiny_tokenizer, inputs=long, truncate=10)
    assert v.request.prompt_ids == tiny_tokenizer(long)["input_ids"][-10:]
    # Default max_new_tokens: whatever fits in max_total_tokens.
    assert v.request.stopping.max_new_tokens == SMALL_CONFIG.max_total_tokens - 10


def test_defaults_when_null(tiny_tokenizer):
    # lorax-client sends every key, null for the unset ones.
    nulls = {name: None for name in Parameters.model_fields}
    v = check(tiny_tokenizer, **nulls)
    ids = tiny_tokenizer("Hello world")["input_ids"]
    assert v.request.prompt_ids == ids and ids[0] == tiny_tokenizer.bos_token_id
    sp = v.request.sampling
    assert not sp.do_sample and sp.greedy and sp.temperature == 1.0 and sp.top_k == 0 and sp.seed is None
    assert sp.repetition_penalty == 1.0 and sp.top_p == 1.0 and sp.typical_p == 1.0
    assert v.request.stopping.max_new_tokens == SMALL_CONFIG.max_total_tokens - len(ids)
    assert v.request.stopping.stop_sequences == () and not v.request.stopping.ignore_eos_token
    assert v.request.adapter_id is None and v.request.top_n_tokens == 0 and not v.request.prefill_logprobs
    assert v.best_of == 1 and not v.details and not v.return_full_text and v.request.request_id


@pytest.mark.parametrize(
    "params, do_sample",
    [
        ({}, False),
        ({"do_sample": True}, True),
        ({"temperature": 0.7}, True),
        ({"temperature": 1.0}, False),
        ({"top_k": 5}, True),
        ({"top_p": 0.9}, True),
        ({"top_p": 1.0}, False),
        ({"typical_p": 0.5}, True),
        ({"do_sample": True, "temperature": 0.0}, False),  # temperature 0 is greedy
        ({"top_k": 5, "temperature": 0.0}, False),
    ],
)
def test_do_sample_semantics(tiny_tokenizer, params, do_sample):
    assert check(tiny_tokenizer, **params).request.sampling.do_sample is do_sample


def test_parameters_are_carried(tiny_tokenizer):
    v = check(
        tiny_tokenizer,
        temperature=0.5,
        top_k=7,
        top_p=0.8,
        typical_p=0.9,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        seed=42,
        max_new_tokens=9,
        stop=["\n"],
        ignore_eos_token=True,
        return_k_alternatives=3,
        decoder_input_details=True,
        adapter_id="some/adapter",
        adapter_source="local",
        return_full_text=True,
        best_of=1,
    )
    sp, st = v.request.sampling, v.request.stopping
    assert (sp.temperature, sp.top_k, sp.top_p, sp.typical_p, sp.seed) == (0.5, 7, 0.8, 0.9, 42)
    assert (sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty) == (1.2, 0.5, -0.5)
    assert (st.max_new_tokens, st.stop_sequences, st.ignore_eos_token) == (9, ("\n",), True)
    assert (
        v.request.top_n_tokens == 3 and v.request.prefill_logprobs and v.details and v.decoder_input_details
    )
    assert v.request.adapter_id == "some/adapter" and v.adapter_source == "local" and v.return_full_text


@pytest.mark.parametrize("adapter", [None, "", "  ", MODEL_ID])
def test_base_model_means_no_adapter(tiny_tokenizer, adapter):
    assert check(tiny_tokenizer, adapter_id=adapter).request.adapter_id is None


def test_chat_template_inputs(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    v = check(tiny_tokenizer, inputs=json.dumps(messages), apply_chat_template=True)
    assert v.inputs == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    # The template writes BOS; the tokenizer must not add a second one.
    assert v.request.prompt_ids == tiny_tokenizer(v.inputs, add_special_tokens=False)["input_ids"]
    assert v.request.prompt_ids.count(tiny_tokenizer.bos_token_id) == 1
    plain = check(tiny_tokenizer, inputs="Hi", apply_chat_template=True)
    assert plain.inputs == v.inputs


def test_http_error_body(client):
    r = client.post("/generate", json={"inputs": "Hello", "parameters": {"top_k": -1}})
    assert r.status_code == 422
    assert r.json() == {
        "error": "Input validation error: `top_k` must be strictly positive",
        "error_type": "validation",
    }
    r = client.post("/generate", json={"inputs": "Hello", "parameters": {"top_k": "many"}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith("Input validation error: `parameters.top_k`")
    r = client.post("/generate", json={"parameters": {}})
    assert r.status_code == 422 and "`inputs`" in r.json()["error"]
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    r = client.post("/generate_stream", json={"inputs": "", "parameters": {}})
    assert r.status_code == 422 and r.json()["error"] == "Input validation error: `inputs` cannot be empty"
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 0})
    assert r.status_code == 422 and "`max_new_tokens` must be strictly positive" in r.json()["error"]
