"""Property-based tests of request validation: whatever `inputs` and `Parameters` a client sends,
`validate_request` either returns a request the engine can run as asked (every invariant below holds) or
raises `gorgon.errors.ValidationError` with a message; never another exception (which would be a 500).

The OpenAI routes map their bodies onto `Parameters` (`openai_routes.completion_inputs`, `chat_inputs`) and
validate them with the same function: the same must hold there.

Values the schema itself refuses (a pydantic error: 422 before validation runs) are skipped. The bugs these
properties found (NaN/inf parameters accepted, RecursionError on deeply nested chat inputs, TypeError on a
non-string chat text part: each a 500) are pinned by regression tests at the end of this file.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pydantic
import pytest
from helpers import SMALL_CONFIG
from hypothesis import assume, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from gorgon.errors import ValidationError
from gorgon.server import openai_schemas as o
from gorgon.server.openai_routes import chat_inputs, completion_inputs
from gorgon.server.schemas import Parameters
from gorgon.server.validation import ADAPTER_SOURCES, MAX_ALTERNATIVES, MAX_SEED, validate_request

MODEL_ID = "fake/tiny-model"
CONFIG = SMALL_CONFIG  # max_input_length 64, max_total_tokens 128, 3 stop sequences, best_of <= 4
PREFIX = "Input validation error: "
EXAMPLES = settings(max_examples=200, deadline=None)

# --- strategies ---------------------------------------------------------------------------------------------

_NAN, _INF = math.nan, math.inf
SPECIAL_FLOATS = [
    0.0,
    -0.0,
    _NAN,
    _INF,
    -_INF,
    5e-324,  # smallest subnormal
    -5e-324,
    2.2250738585072014e-308,  # smallest normal
    1e-300,
    1e-6,
    0.5,
    1.0,
    -1.0,
    2.0,
    -2.0,
    math.nextafter(0.0, 1.0),
    math.nextafter(1.0, 0.0),
    math.nextafter(1.0, 2.0),
    math.nextafter(2.0, 3.0),
    math.nextafter(-2.0, -3.0),
    1e300,
    1.7976931348623157e308,
]
SPECIAL_INTS = [
    0,
    1,
    -1,
    2,
    CONFIG.max_input_length - 1,
    CONFIG.max_input_length,
    CONFIG.max_input_length + 1,
    CONFIG.max_total_tokens - 1,
    CONFIG.max_total_tokens,
    CONFIG.max_total_tokens + 1,
    2**31 - 1,
    2**31,
    2**63 - 1,
    2**63,
    MAX_SEED,
    MAX_SEED + 1,
    -(2**63),
    10**30,
    -(10**30),
]


def _floats(valid: st.SearchStrategy[float]) -> st.SearchStrategy[float | None]:
    """Null, a valid value, a boundary / non-finite / subnormal value, or any double at all."""
    return st.one_of(st.none(), valid, st.sampled_from(SPECIAL_FLOATS), st.floats())


def _ints(valid: st.SearchStrategy[int]) -> st.SearchStrategy[int | None]:
    return st.one_of(st.none(), valid, st.sampled_from(SPECIAL_INTS), st.integers())


_BOOLS = st.one_of(st.none(), st.booleans())
# Any code point, lone surrogates included (JSON can carry them as \ud800 escapes).
_ANY_CHAR = st.one_of(st.characters(), st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF))
_TEXT = st.text(_ANY_CHAR, max_size=40)
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _TEXT)

PARAMETER_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "adapter_id": st.one_of(st.none(), _TEXT, st.sampled_from([MODEL_ID, "", "  ", f" {MODEL_ID} "])),
    "adapter_source": st.one_of(st.none(), st.sampled_from(ADAPTER_SOURCES), _TEXT),
    "api_token": st.one_of(st.none(), _TEXT),
    "merged_adapters": st.one_of(st.none(), st.none(), st.dictionaries(_TEXT, _JSON_SCALARS, max_size=2)),
    "best_of": _ints(st.integers(1, CONFIG.max_best_of)),
    "do_sample": _BOOLS,
    "temperature": _floats(st.floats(0.0, 5.0)),
    "top_k": _ints(st.integers(1, 400)),
    "top_p": _floats(st.floats(0.0, 1.0, exclude_min=True)),
    "typical_p": _floats(st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)),
    "repetition_penalty": _floats(st.floats(0.01, 10.0)),
    "frequency_penalty": _floats(st.floats(-2.0, 2.0)),
    "presence_penalty": _floats(st.floats(-2.0, 2.0)),
    "max_new_tokens": _ints(st.integers(1, CONFIG.max_total_tokens)),
    "ignore_eos_token": _BOOLS,
    "return_full_text": _BOOLS,
    "stop": st.one_of(
        st.none(), st.lists(st.text(_ANY_CHAR, max_size=8), max_size=CONFIG.max_stop_sequences + 2)
    ),
    "truncate": _ints(st.integers(1, CONFIG.max_input_length)),
    "watermark": _BOOLS,
    "details": _BOOLS,
    "decoder_input_details": _BOOLS,
    "return_k_alternatives": _ints(st.integers(0, MAX_ALTERNATIVES)),
    "seed": _ints(st.integers(0, MAX_SEED)),
    "response_format": st.one_of(st.none(), st.none(), st.dictionaries(_TEXT, _JSON_SCALARS, max_size=2)),
    "apply_chat_template": _BOOLS,
}
# Each field absent or present (null, valid, boundary or invalid).
PARAMETERS = st.fixed_dictionaries({}, optional=PARAMETER_FIELDS)

_MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system"]), _TEXT)},
    optional={"content": _JSON_SCALARS},
)
INPUTS = st.one_of(
    _TEXT,
    st.just(""),
    st.text(_ANY_CHAR, min_size=100, max_size=2000),  # long: often past max_input_length tokens
    st.integers(1, 40).map(lambda n: "The quick brown fox jumps over the lazy dog. " * n),
    st.lists(_MESSAGE, max_size=4).map(json.dumps),  # chat messages, for apply_chat_template
    st.lists(_JSON_SCALARS, max_size=3).map(json.dumps),  # a JSON list that is not messages
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),  # deep nesting
)


# --- invariants ---------------------------------------------------------------------------------------------


def _validate(tokenizer, inputs: str, params: Parameters | None, stream: bool = False):
    return validate_request(
        inputs, params, tokenizer=tokenizer, config=CONFIG, model_id=MODEL_ID, stream=stream
    )


def _check_message(e: ValidationError) -> None:
    if currently_in_test_context():  # --hypothesis-show-statistics: what got tested
        event(f"refused: {e.message[len(PREFIX) :][:30]}")
    assert e.message.startswith(PREFIX) and e.message[len(PREFIX) :].strip(), e.message
    assert e.status_code == 422 and e.error_type == "validation"


def _check_request(v, p: Parameters, stream: bool, tokenizer) -> None:
    """Everything the engine and the response builders rely on, for a request that passed validation."""
    event("accepted")
    r, s, stop = v.request, v.request.sampling, v.request.stopping
    # Prompt: non-empty token ids of the tokenizer, within the limits, truncated from the left.
    ids = r.prompt_ids
    assert isinstance(ids, list) and 1 <= len(ids) <= CONFIG.max_input_length
    assert all(isinstance(t, int) and 0 <= t < len(tokenizer) for t in ids)
    if p.truncate is not None:
        assert 0 < p.truncate <= CONFIG.max_input_length and len(ids) <= p.truncate
    full = tokenizer(v.inputs, add_special_tokens=not p.apply_chat_template)["input_ids"]
    assert ids == full[len(full) - len(ids) :]
    if p.truncate is None or len(full) <= p.truncate:
        assert ids == full
    # Lengths.
    assert isinstance(stop.max_new_tokens, int) and stop.max_new_tokens >= 1
    assert len(ids) + stop.max_new_tokens <= CONFIG.max_total_tokens
    if p.max_new_tokens is not None:
        assert stop.max_new_tokens == p.max_new_tokens
    # Sampling: finite numbers in range; temperature 0 means greedy; sampling means a positive temperature.
    for name in ("temperature", "top_p", "typical_p", "repetition_penalty"):
        assert math.isfinite(getattr(s, name)), (name, s)
    assert s.temperature >= 0.0 and 0.0 < s.top_p <= 1.0 and 0.0 < s.typical_p <= 1.0
    assert s.repetition_penalty > 0.0
    assert -2.0 <= s.frequency_penalty <= 2.0 and -2.0 <= s.presence_penalty <= 2.0
    assert isinstance(s.top_k, int) and s.top_k >= 0
    if s.do_sample:
        assert s.temperature > 0.0
    if s.temperature == 0.0:
        assert s.greedy
    assert s.seed is None or (isinstance(s.seed, int) and 0 <= s.seed <= MAX_SEED)
    # Stops, alternatives, best_of, streaming rules.
    assert len(stop.stop_sequences) <= CONFIG.max_stop_sequences
    assert all(isinstance(x, str) and x for x in stop.stop_sequences)
    assert 0 <= r.top_n_tokens <= MAX_ALTERNATIVES
    assert 1 <= v.best_of <= CONFIG.max_best_of
    if v.best_of > 1:
        assert s.do_sample and s.seed is None and not stream
    if stream:
        assert not v.decoder_input_details and not r.prefill_logprobs
    assert r.adapter_source in ADAPTER_SOURCES
    assert r.adapter_id is None or (
        r.adapter_id == r.adapter_id.strip() and r.adapter_id and r.adapter_id != MODEL_ID
    )
    assert not p.watermark and p.merged_adapters is None and p.response_format is None
    assert r.request_id


def _parameters_or_none(fields: dict[str, Any]) -> Parameters | None:
    try:
        return Parameters(**fields)
    except pydantic.ValidationError:
        return None  # refused by the schema itself: a 422 before validation runs


# --- properties ---------------------------------------------------------------------------------------------


@EXAMPLES
@given(inputs=INPUTS, fields=PARAMETERS, stream=st.booleans())
def test_validation_returns_a_sound_request_or_a_validation_error(tiny_tokenizer, inputs, fields, stream):
    p = _parameters_or_none(fields)
    assume(p is not None)
    try:
        v = _validate(tiny_tokenizer, inputs, p, stream)
    except ValidationError as e:
        _check_message(e)
        return
    _check_request(v, p, stream, tiny_tokenizer)


_VALID_FIELDS = {
    "temperature": st.floats(0.0, 5.0),
    "top_k": st.integers(1, 400),
    "top_p": st.floats(0.0, 1.0, exclude_min=True),
    "typical_p": st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
    "repetition_penalty": st.floats(1e-3, 1e3),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "presence_penalty": st.floats(-2.0, 2.0),
    "seed": st.integers(0, MAX_SEED),
    "max_new_tokens": st.integers(1, CONFIG.max_total_tokens - CONFIG.max_input_length),
    "truncate": st.integers(1, CONFIG.max_input_length),
    "return_k_alternatives": st.integers(0, MAX_ALTERNATIVES),
    # Valid stop sequences are valid Unicode: lone surrogates are refused (PARAMETER_FIELDS feeds those).
    "stop": st.lists(
        st.text(st.characters(codec="utf-8"), min_size=1, max_size=8), max_size=CONFIG.max_stop_sequences
    ),
    "do_sample": st.booleans(),
    "details": st.booleans(),
    "decoder_input_details": st.booleans(),
    "ignore_eos_token": st.booleans(),
    "return_full_text": st.booleans(),
    "adapter_source": st.sampled_from(ADAPTER_SOURCES),
    "adapter_id": st.one_of(st.none(), st.sampled_from(["some/adapter", MODEL_ID, ""])),
    "watermark": st.just(False),
}


@EXAMPLES
@given(
    inputs=st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(str.strip),
    fields=st.fixed_dictionaries({}, optional=_VALID_FIELDS),
)
def test_valid_parameters_are_accepted_and_carried(tiny_tokenizer, inputs, fields):
    """No false rejections: in-range values on a prompt that fits are accepted, and carried as sent."""
    p = Parameters(**fields)
    n_in = len(tiny_tokenizer(inputs)["input_ids"])
    assume(n_in <= CONFIG.max_input_length or p.truncate is not None)
    v = _validate(tiny_tokenizer, inputs, p)
    _check_request(v, p, False, tiny_tokenizer)
    s = v.request.sampling
    for name in ("temperature", "top_p", "typical_p", "repetition_penalty", "seed"):
        if getattr(p, name) is not None:
            assert getattr(s, name) == getattr(p, name), name
    assert s.top_k == (p.top_k or 0)
    assert v.request.stopping.stop_sequences == tuple(p.stop or ())
    assert v.request.top_n_tokens == (p.return_k_alternatives or 0)
    assert s.do_sample == (
        (
            bool(p.do_sample)
            or p.temperature not in (None, 1.0)
            or p.top_k is not None
            or s.top_p < 1.0
            or s.typical_p < 1.0
        )
        and s.temperature != 0.0
    )


@EXAMPLES
@given(inputs=INPUTS, fields=PARAMETERS)
def test_validation_is_deterministic(tiny_tokenizer, inputs, fields):
    """Same request, same verdict (and same request, up to its id)."""
    p = _parameters_or_none(fields)
    assume(p is not None)

    def verdict():
        try:
            v = _validate(tiny_tokenizer, inputs, p)
        except ValidationError as e:
            return e.message
        return (v.request.prompt_ids, v.request.sampling, v.request.stopping, v.inputs, v.best_of)

    assert verdict() == verdict()


# --- the OpenAI mapping -------------------------------------------------------------------------------------

_OPENAI_COMMON = {
    "model": st.one_of(st.none(), _TEXT, st.just(MODEL_ID)),
    "max_tokens": PARAMETER_FIELDS["max_new_tokens"],
    "temperature": PARAMETER_FIELDS["temperature"],
    "top_p": PARAMETER_FIELDS["top_p"],
    "n": _ints(st.just(1)),
    "stream": _BOOLS,
    "stop": st.one_of(st.none(), st.text(_ANY_CHAR, max_size=8), PARAMETER_FIELDS["stop"]),
    "presence_penalty": PARAMETER_FIELDS["presence_penalty"],
    "frequency_penalty": PARAMETER_FIELDS["frequency_penalty"],
    "seed": PARAMETER_FIELDS["seed"],
    "user": st.one_of(st.none(), _TEXT),
    "repetition_penalty": PARAMETER_FIELDS["repetition_penalty"],
    "top_k": PARAMETER_FIELDS["top_k"],
    "ignore_eos_token": _BOOLS,
    "adapter_source": PARAMETER_FIELDS["adapter_source"],
    "api_token": PARAMETER_FIELDS["api_token"],
}
COMPLETION_BODIES = st.fixed_dictionaries(
    {"prompt": st.one_of(INPUTS, st.lists(_TEXT, max_size=3))},
    optional={
        **_OPENAI_COMMON,
        "echo": _BOOLS,
        "best_of": PARAMETER_FIELDS["best_of"],
        "logprobs": _ints(st.integers(0, MAX_ALTERNATIVES)),
        "suffix": st.one_of(st.none(), st.just(""), _TEXT),
    },
)
_CONTENT_PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}),
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"])}, optional={"text": _TEXT}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url"]), _JSON_SCALARS, max_size=3),  # any shape
)
_CHAT_MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["user", "assistant", "system"]), _TEXT)},
    optional={"content": st.one_of(st.none(), _TEXT, st.lists(_CONTENT_PART, max_size=3))},
)
CHAT_BODIES = st.fixed_dictionaries(
    {"messages": st.lists(_CHAT_MESSAGE, max_size=4)},
    optional={
        **_OPENAI_COMMON,
        "max_completion_tokens": PARAMETER_FIELDS["max_new_tokens"],
        "logprobs": _BOOLS,
        "top_logprobs": _ints(st.integers(0, MAX_ALTERNATIVES)),
        "response_format": st.one_of(
            st.none(), st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})
        ),
        "tools": st.one_of(st.none(), st.just([]), st.just([{"type": "function"}])),
    },
)


def _check_openai(tokenizer, body, mapping):
    """The mapping then the validation: a sound request or a ValidationError. Returns the request or None."""
    try:
        inputs, params = mapping(body)
        v = _validate(tokenizer, inputs, params, bool(body.stream))
    except ValidationError as e:
        _check_message(e)
        return None
    _check_request(v, params, bool(body.stream), tokenizer)
    return v


@EXAMPLES
@given(fields=COMPLETION_BODIES)
def test_openai_completion_mapping_raises_only_validation_errors(tiny_tokenizer, fields):
    try:
        body = o.CompletionRequest.model_validate(fields)
    except pydantic.ValidationError:
        return  # the schema's own 422
    v = _check_openai(tiny_tokenizer, body, completion_inputs)
    if v is not None:
        assert body.n in (None, 1) and not body.suffix
        assert v.request.top_n_tokens == (body.logprobs or 0)
        assert v.request.prompt_ids[0] == tiny_tokenizer.bos_token_id


@EXAMPLES
@given(fields=CHAT_BODIES)
def test_openai_chat_mapping_raises_only_validation_errors(tiny_tokenizer, fields):
    try:
        body = o.ChatCompletionRequest.model_validate(fields)
    except pydantic.ValidationError:
        return
    v = _check_openai(tiny_tokenizer, body, chat_inputs)
    if v is not None:
        assert body.messages and not body.tools and body.n in (None, 1)
        # The prompt is the chat template's rendering of the messages, ready for the assistant's turn.
        assert v.inputs.endswith("<|assistant|>\n")
        assert v.request.prompt_ids.count(tiny_tokenizer.bos_token_id) >= 1


# --- non-finite numbers -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [_NAN, _INF, -_INF, 1e999])
@pytest.mark.parametrize(
    "field", [name for name, f in Parameters.model_fields.items() if f.annotation == float | None]
)
def test_non_finite_numbers_never_reach_the_engine(tiny_tokenizer, field, value):
    """`nan < 0` and `nan <= 0` are false and +inf is "positive": a NaN or infinite temperature or penalty
    would pass every range check and make the engine sample from NaN logits. The schema or the validation
    must refuse it (pinned by name because the general property merely skips what the schema refuses)."""
    p = _parameters_or_none({field: value, "max_new_tokens": 4})
    if p is None:
        return  # refused by the schema (422)
    with pytest.raises(ValidationError):
        _validate(tiny_tokenizer, "Hello", p)


# --- regressions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 900, 5000, 100_000])
def test_deeply_nested_chat_inputs_are_plain_text(tiny_tokenizer, depth):
    """json.loads raises RecursionError (not a ValueError) on deep nesting: it escaped validation as a 500.
    Such inputs are not messages: plain text, here too long for the prompt (or, shallow, an empty list)."""
    p = Parameters(apply_chat_template=True, max_new_tokens=4)
    with pytest.raises(ValidationError) as e:
        _validate(tiny_tokenizer, "[" * depth + "]" * depth, p)
    _check_message(e.value)


@pytest.mark.parametrize("text", [None, 5, ["a"], {"text": "a"}])
def test_chat_text_part_that_is_not_a_string_is_a_validation_error(tiny_tokenizer, text):
    """`ChatMessage.content` is `str | list[dict[str, Any]]`, so `{"type": "text", "text": null}` passes the
    schema; `"".join(...)` then raised TypeError (a 500)."""
    body = o.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}], "max_tokens": 4}
    )
    with pytest.raises(ValidationError) as e:
        chat_inputs(body)
    _check_message(e.value)
