"""A catalogue of malformed and hostile requests against every route of the live server (real engine).

Each case is one HTTP request and what must come back: the status and, for errors, the LoRAX error body
`{"error": message, "error_type": type}` (422 validation, 424 generation, 404/405 for routes). Nothing may
answer 500 or hang, and after the whole catalogue the server must still generate and report healthy.

Decisions this catalogue pins down:
- unknown fields, top level or in `parameters`, are ignored (as LoRAX);
- pydantic's lax mode stays: "5" and true are taken where an integer is expected (as 5 and 1); words are not;
- a JSON body sent as `text/plain`, or with no content type at all, is refused (422, saying to send
  `Content-Type: application/json`): FastAPI reads only declared JSON (a CSRF guard), as LoRAX's axum does;
- bodies over the payload limit (2 MB, LoRAX's default) are refused with 413 before they are parsed;
- any chat role name is accepted: the chat template decides what it renders;
- NaN and infinities are refused wherever a number is expected.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from robustness_report import record

_NO_BODY = object()
GENERATION_ROUTES = ["/", "/generate", "/generate_stream"]
POST_ROUTES = [*GENERATION_ROUTES, "/v1/completions", "/v1/chat/completions", "/tokenize"]
TEXT = "Hello world"
# ~200 tokens of the tiny tokenizer: past max_input_length (64).
LONG = "The quick brown fox jumps over the lazy dog. " * 20
SMALL = {"max_new_tokens": 4}


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    status: int
    error_type: str | None = None  # None: a success, no error body expected
    json: Any = _NO_BODY  # a JSON value to send (None sends `null`)
    raw: bytes | None = None  # raw body bytes (sent as application/json unless headers say otherwise)
    headers: dict[str, str] = field(default_factory=dict)
    message: str | None = None  # a substring the error message must contain
    max_seconds: float = 30.0  # answered within this (a hang or a slow refusal fails)


def gen(parameters: dict[str, Any] | None = None, inputs: Any = TEXT, **top: Any) -> dict[str, Any]:
    """A LoRAX body; `parameters` get a small `max_new_tokens` unless they set their own."""
    params = {**SMALL, **(parameters or {})}
    return {"inputs": inputs, "parameters": params, **top}


def param_case(name: str, params: dict[str, Any], status: int, message: str | None = None, **kw) -> Case:
    error_type = None if status == 200 else ("validation" if status == 422 else "generation")
    return Case(
        f"generate-{name}", "POST", "/generate", status, error_type, json=gen(params), message=message, **kw
    )


def raw_params(name: str, params_json: str, message: str) -> Case:
    """Parameters written as raw JSON text (for NaN / Infinity, which `json.dumps` would not refuse)."""
    body = f'{{"inputs": "{TEXT}", "parameters": {params_json}}}'.encode()
    return Case(f"generate-{name}", "POST", "/generate", 422, "validation", raw=body, message=message)


def chat(messages: Any = None, **top: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": "Hi"}] if messages is None else messages}
    return {"max_tokens": 4, **body, **top}


def completion(**top: Any) -> dict[str, Any]:
    return {"prompt": TEXT, "max_tokens": 4, **top}


def adapter_case(name: str, adapter_id: str, source: str | None, message: str | None = None) -> Case:
    params = {"adapter_id": adapter_id, **({"adapter_source": source} if source else {})}
    return Case(
        f"adapter-{name}-{source or 'default'}",
        "POST",
        "/generate",
        424,
        "generation",
        json=gen(params),
        message=message,
    )


def _body_cases() -> list[Case]:
    """Bodies that are not a request at all, on every POST route."""
    cases = []
    for path in POST_ROUTES:
        slug = path.strip("/").replace("/", "_") or "root"
        cases += [
            Case(
                f"{slug}-broken-json", "POST", path, 422, "validation", raw=b'{"inputs": "Hel', message="JSON"
            ),
            Case(f"{slug}-empty-body", "POST", path, 422, "validation", raw=b"", message="body"),
            Case(f"{slug}-body-list", "POST", path, 422, "validation", json=[TEXT]),
            Case(f"{slug}-body-string", "POST", path, 422, "validation", json=TEXT),
            Case(f"{slug}-invalid-utf8", "POST", path, 422, "validation", raw=b"\xff\xfe\xfa\x00{}"),
        ]
    cases += [
        Case("generate-body-number", "POST", "/generate", 422, "validation", json=42),
        Case("generate-body-null", "POST", "/generate", 422, "validation", json=None),
        Case("generate-trailing-garbage", "POST", "/generate", 422, "validation", raw=b'{"inputs": "a"} x'),
        Case(
            "generate-invalid-utf8-in-string",
            "POST",
            "/generate",
            422,
            "validation",
            raw=b'{"inputs": "\xff\xfe hi", "parameters": {"max_new_tokens": 4}}',
        ),
        Case(
            "generate-deep-nesting",
            "POST",
            "/generate",
            422,
            "validation",
            raw=b"[" * 100_000 + b"]" * 100_000,
        ),
        Case(
            "generate-text-plain-json",
            "POST",
            "/generate",
            422,
            "validation",
            raw=json.dumps(gen()).encode(),
            headers={"content-type": "text/plain"},
            message="JSON",
        ),
        Case(
            "generate-form-encoded",
            "POST",
            "/generate",
            422,
            "validation",
            raw=b"inputs=Hello&max_new_tokens=4",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        Case(
            "generate-no-content-type-json",
            "POST",
            "/generate",
            422,
            "validation",
            raw=json.dumps(gen()).encode(),
            headers={"content-type": ""},
            message="Content-Type: application/json",
        ),
        Case(
            "generate-body-over-payload-limit",
            "POST",
            "/generate",
            413,
            "validation",
            json=gen(inputs="a" * 2_100_000),
            message="payload limit",
            max_seconds=5.0,
        ),
        Case(
            "tokenize-body-over-payload-limit",
            "POST",
            "/tokenize",
            413,
            "validation",
            json={"inputs": "a" * 2_100_000},
            message="payload limit",
            max_seconds=5.0,
        ),
    ]
    return cases


def _inputs_cases() -> list[Case]:
    return [
        Case(
            "generate-inputs-missing",
            "POST",
            "/generate",
            422,
            "validation",
            json={"parameters": SMALL},
            message="`inputs`",
        ),
        Case(
            "generate-inputs-empty",
            "POST",
            "/generate",
            422,
            "validation",
            json=gen(inputs=""),
            message="`inputs` cannot be empty",
        ),
        Case(
            "generate-inputs-number",
            "POST",
            "/generate",
            422,
            "validation",
            json=gen(inputs=42),
            message="`inputs`",
        ),
        Case(
            "generate-inputs-null",
            "POST",
            "/generate",
            422,
            "validation",
            json=gen(inputs=None),
            message="`inputs`",
        ),
        Case("generate-inputs-list", "POST", "/generate", 422, "validation", json=gen(inputs=["a", "b"])),
        Case(
            "generate-inputs-1MB",
            "POST",
            "/generate",
            422,
            "validation",
            json=gen(inputs="a" * 1_000_000),
            message="`inputs` must have at most 64 tokens",
            max_seconds=8.0,  # ~1 s here: tokenized once, then refused
        ),
        Case(
            "generate-inputs-1MB-truncate",
            "POST",
            "/generate",
            200,
            json=gen({"truncate": 16}, inputs="hello world " * 90_000),
            max_seconds=10.0,
        ),
        Case(
            "generate-inputs-too-long",
            "POST",
            "/generate",
            422,
            "validation",
            json=gen(inputs=LONG),
            message="at most 64 tokens",
        ),
        Case(
            "generate-inputs-too-long-truncate",
            "POST",
            "/generate",
            200,
            json=gen({"truncate": 32}, inputs=LONG),
        ),
        Case(
            "generate_stream-inputs-too-long-truncate",
            "POST",
            "/generate_stream",
            200,
            json=gen({"truncate": 32}, inputs=LONG),
        ),
        Case("generate-inputs-nul", "POST", "/generate", 200, json=gen(inputs="a\u0000b\u0000")),
        Case("generate-inputs-whitespace", "POST", "/generate", 200, json=gen(inputs=" ")),
        Case(
            "generate-inputs-lone-surrogate",
            "POST",
            "/generate",
            422,
            "validation",
            raw=b'{"inputs": "a\\ud800b", "parameters": {"max_new_tokens": 4}}',
        ),
        Case(
            "generate-inputs-control-and-emoji",
            "POST",
            "/generate",
            200,
            json=gen(inputs="\x1b[31m\u202e\U0001f600\ufeff"),
        ),
        Case(
            "generate-parameters-list",
            "POST",
            "/generate",
            422,
            "validation",
            json={"inputs": TEXT, "parameters": [1]},
        ),
        Case(
            "generate-parameters-string",
            "POST",
            "/generate",
            422,
            "validation",
            json={"inputs": TEXT, "parameters": "fast"},
        ),
        Case(
            "generate-parameters-null",
            "POST",
            "/generate",
            200,
            # Every default: max_new_tokens fills max_total_tokens (the tiny model is fast).
            json={"inputs": TEXT, "parameters": None},
        ),
        Case(
            "generate-unknown-fields",
            "POST",
            "/generate",
            200,
            json=gen({"foo": 1, "bar": [1]}, extra={"x": 1}),
        ),
        Case("generate-stream-flag-ignored", "POST", "/generate", 200, json=gen(stream=True)),
    ]


def _parameter_cases() -> list[Case]:
    big = 10**30
    return [
        param_case("max_new_tokens-word", {"max_new_tokens": "ten"}, 422, "`parameters.max_new_tokens`"),
        param_case("max_new_tokens-digits-string", {"max_new_tokens": "4"}, 200),
        param_case("max_new_tokens-float", {"max_new_tokens": 1.5}, 422, "`parameters.max_new_tokens`"),
        param_case(
            "max_new_tokens-negative",
            {"max_new_tokens": -1},
            422,
            "`max_new_tokens` must be strictly positive",
        ),
        param_case(
            "max_new_tokens-zero", {"max_new_tokens": 0}, 422, "`max_new_tokens` must be strictly positive"
        ),
        param_case("max_new_tokens-huge", {"max_new_tokens": big}, 422, "must be <= 128"),
        param_case(
            "max_new_tokens-past-total", {"max_new_tokens": 125}, 422, "`max_new_tokens` must be <= 128"
        ),
        param_case("max_new_tokens-bool", {"max_new_tokens": True}, 200),  # lax mode: true is 1
        param_case("temperature-zero", {"temperature": 0}, 200),
        param_case("temperature-negative", {"temperature": -0.5}, 422, "`temperature` must be non-negative"),
        param_case("temperature-string", {"temperature": "hot"}, 422, "`parameters.temperature`"),
        param_case("temperature-tiny", {"temperature": 1e-300}, 200),
        param_case("temperature-huge", {"temperature": 1e300}, 200),
        raw_params("temperature-nan", '{"temperature": NaN}', "`parameters.temperature`"),
        raw_params("temperature-infinity", '{"temperature": Infinity}', "`parameters.temperature`"),
        raw_params("temperature-1e999", '{"temperature": 1e999}', "`parameters.temperature`"),
        raw_params(
            "repetition_penalty-nan", '{"repetition_penalty": NaN}', "`parameters.repetition_penalty`"
        ),
        raw_params(
            "top_p-minus-infinity", '{"top_p": -Infinity}', "`parameters.top_p`: Input should be a finite"
        ),
        param_case("top_p-zero", {"top_p": 0}, 422, "`top_p` must be > 0.0 and <= 1.0"),
        param_case("top_p-1.5", {"top_p": 1.5}, 422, "`top_p` must be > 0.0 and <= 1.0"),
        param_case("top_k-zero", {"top_k": 0}, 422, "`top_k` must be strictly positive"),
        param_case("top_k-negative", {"top_k": -5}, 422, "`top_k` must be strictly positive"),
        param_case("top_k-huge", {"top_k": big}, 200),
        param_case(
            "repetition_penalty-zero", {"repetition_penalty": 0}, 422, "`repetition_penalty` must be strictly"
        ),
        param_case(
            "repetition_penalty-negative", {"repetition_penalty": -1}, 422, "`repetition_penalty` must be"
        ),
        param_case("repetition_penalty-huge", {"repetition_penalty": 1e300}, 200),
        param_case("typical_p-one", {"typical_p": 1.0}, 422, "`typical_p` must be > 0.0 and < 1.0"),
        param_case("typical_p-negative", {"typical_p": -0.1}, 422, "`typical_p` must be > 0.0 and < 1.0"),
        param_case(
            "frequency_penalty-3", {"frequency_penalty": 3}, 422, "`frequency_penalty` must be >= -2.0"
        ),
        param_case("seed-negative", {"seed": -1}, 422, "`seed` must be a non-negative 64-bit integer"),
        param_case("seed-too-big", {"seed": 2**64}, 422, "`seed` must be a non-negative 64-bit integer"),
        param_case("seed-max", {"seed": 2**64 - 1, "do_sample": True}, 200),
        param_case("seed-string", {"seed": "lucky"}, 422, "`parameters.seed`"),
        param_case("best_of-zero", {"best_of": 0}, 422, "`best_of` must be > 0 and <= 2. Given: 0"),
        param_case(
            "best_of-too-many", {"best_of": 3, "do_sample": True}, 422, "`best_of` must be > 0 and <= 2"
        ),
        param_case("best_of-greedy", {"best_of": 2}, 422, "you must use sampling when `best_of` is > 1"),
        param_case(
            "best_of-with-seed", {"best_of": 2, "do_sample": True, "seed": 1}, 422, "`seed` must not be set"
        ),
        param_case("best_of-2-sampled", {"best_of": 2, "do_sample": True}, 200),
        param_case(
            "stop-too-many", {"stop": ["a", "b", "c", "d"]}, 422, "`stop` supports up to 3 stop sequences"
        ),
        param_case("stop-empty-string", {"stop": [""]}, 422, "`stop` sequences cannot be empty"),
        param_case("stop-not-a-list", {"stop": "abc"}, 422, "`parameters.stop`"),
        param_case("stop-numbers", {"stop": [1, 2]}, 422, "`parameters.stop"),
        param_case("stop-very-long", {"stop": ["x" * 10_000]}, 200),
        Case(
            "generate-stop-lone-surrogate",
            "POST",
            "/generate",
            422,
            "validation",
            raw=b'{"inputs": "Hi", "parameters": {"stop": ["\\udfff"], "max_new_tokens": 4}}',
            message="`stop` is not valid Unicode",
        ),
        Case(
            "generate-adapter_source-lone-surrogate",
            "POST",
            "/generate",
            422,
            "validation",
            raw=b'{"inputs": "Hi", "parameters": {"adapter_source": "hub\\ud800"}}',
            message="`adapter_source` must be one of",
        ),
        param_case(
            "return_k_alternatives-negative", {"return_k_alternatives": -1}, 422, "`return_k_alternatives`"
        ),
        param_case("return_k_alternatives-11", {"return_k_alternatives": 11}, 422, "`return_k_alternatives`"),
        param_case("return_k_alternatives-10", {"return_k_alternatives": 10, "details": True}, 200),
        param_case("truncate-negative", {"truncate": -1}, 422, "`truncate` must be strictly positive"),
        param_case("truncate-past-max-input", {"truncate": 65}, 422, "at most 64. Given: 65"),
        param_case(
            "adapter_source-unknown", {"adapter_source": "ftp"}, 422, "`adapter_source` must be one of"
        ),
        param_case("adapter_id-number", {"adapter_id": 7}, 422, "`parameters.adapter_id`"),
        param_case("watermark", {"watermark": True}, 422, "`watermark` is not supported"),
        param_case(
            "merged_adapters", {"merged_adapters": {"ids": ["a"]}}, 422, "`merged_adapters` is not supported"
        ),
        param_case("response_format", {"response_format": {"type": "json_object"}}, 422, "`response_format`"),
        param_case("chat-template-plain-text", {"apply_chat_template": True}, 200),
        Case(
            "generate-chat-template-deep-json",
            "POST",
            "/generate",
            422,  # read as one user message: far too long for max_input_length
            "validation",
            json=gen({"apply_chat_template": True}, inputs="[" * 5000),
            message="must have at most 64 tokens",
        ),
        param_case("details-string", {"details": "very"}, 422, "`parameters.details`"),
        Case(
            "generate_stream-best_of",
            "POST",
            "/generate_stream",
            422,
            "validation",
            json=gen({"best_of": 2, "do_sample": True}),
            message="`best_of` != 1 is not supported when streaming",
        ),
        Case(
            "root-stream-best_of",
            "POST",
            "/",
            422,
            "validation",
            json=gen({"best_of": 2, "do_sample": True}, stream=True),
            message="`best_of` != 1 is not supported when streaming",
        ),
        Case(
            "generate_stream-decoder_input_details",
            "POST",
            "/generate_stream",
            422,
            "validation",
            json=gen({"decoder_input_details": True}),
            message="`decoder_input_details` == true is not supported when streaming",
        ),
        Case("root-stream-ok", "POST", "/", 200, json=gen(stream=True)),
        Case(
            "root-stream-not-bool",
            "POST",
            "/",
            422,
            "validation",
            json=gen(stream="yes please"),
            message="`stream`",
        ),
    ]


def _adapter_cases() -> list[Case]:
    return [
        adapter_case("dotdot", "../../etc", "local"),
        adapter_case("dotdot", "../../etc", "hub"),
        adapter_case("absolute-dir", "/etc", "local", "neither a LoRA"),
        adapter_case("absolute-file", "/etc/passwd", "local", "a file, not a directory"),
        adapter_case("missing-dir", "/nonexistent/adapter", "local", "no such directory"),
        adapter_case("nul", "ad\u0000apter", "local", "NUL"),
        adapter_case("nul", "ad\u0000apter", "hub", "NUL"),
        adapter_case("very-long", "x" * 10_000, "local"),
        adapter_case("very-long", "x" * 10_000, "hub"),
        adapter_case("url", "https://evil.example/adapter", "hub"),
        adapter_case("url", "https://evil.example/adapter", "local"),
        adapter_case("hub-uncached", "some-org/some-adapter", None, "HF_HUB_OFFLINE"),
        adapter_case("s3", "bucket/adapter", "s3", "Unknown adapter source"),
        adapter_case("pbase", "my-adapter", "pbase", "Unknown adapter source"),
        adapter_case("newline", "org/adapter\r\nX-Injected: 1", "hub"),
        Case(
            "generate_stream-adapter-dotdot",
            "POST",
            "/generate_stream",
            424,
            "generation",
            json=gen({"adapter_id": "../../etc", "adapter_source": "local"}),
        ),
        Case(
            "completions-adapter-model-dotdot",
            "POST",
            "/v1/completions",
            424,
            "generation",
            json=completion(model="../../etc", adapter_source="local"),
        ),
        Case(
            "chat-adapter-lone-surrogate",
            "POST",
            "/v1/chat/completions",
            424,
            "generation",
            raw=b'{"model": "a\\udc80b", "adapter_source": "local", "messages": [{"role": "user", "content": "Hi"}]}',
        ),
    ]


def _openai_cases() -> list[Case]:
    c, ch = "/v1/completions", "/v1/chat/completions"
    return [
        Case("completions-ok", "POST", c, 200, json=completion()),
        Case(
            "completions-prompt-missing",
            "POST",
            c,
            422,
            "validation",
            json={"max_tokens": 4},
            message="`prompt`",
        ),
        Case("completions-prompt-number", "POST", c, 422, "validation", json=completion(prompt=42)),
        Case(
            "completions-prompt-batch",
            "POST",
            c,
            422,
            "validation",
            json=completion(prompt=["a", "b"]),
            message="one string",
        ),
        Case(
            "completions-prompt-empty-list",
            "POST",
            c,
            422,
            "validation",
            json=completion(prompt=[]),
            message="one string",
        ),
        Case(
            "completions-prompt-empty",
            "POST",
            c,
            422,
            "validation",
            json=completion(prompt=""),
            message="cannot be empty",
        ),
        Case("completions-max_tokens-negative", "POST", c, 422, "validation", json=completion(max_tokens=-1)),
        Case("completions-n-2", "POST", c, 422, "validation", json=completion(n=2), message="`n`"),
        Case("completions-n-0", "POST", c, 422, "validation", json=completion(n=0), message="`n`"),
        Case(
            "completions-n-2-stream",
            "POST",
            c,
            422,
            "validation",
            json=completion(n=2, stream=True),
            message="`n`",
        ),
        Case(
            "completions-logprobs-negative",
            "POST",
            c,
            422,
            "validation",
            json=completion(logprobs=-1),
            message="`logprobs` must be >= 0",
        ),
        Case(
            "completions-logprobs-11",
            "POST",
            c,
            422,
            "validation",
            json=completion(logprobs=11),
            message="`logprobs` must be >= 0 and <= 10",
        ),
        Case(
            "completions-best_of-3", "POST", c, 422, "validation", json=completion(best_of=3, temperature=0.8)
        ),
        Case(
            "completions-best_of-stream",
            "POST",
            c,
            422,
            "validation",
            json=completion(best_of=2, temperature=0.8, stream=True),
        ),
        Case(
            "completions-suffix",
            "POST",
            c,
            422,
            "validation",
            json=completion(suffix="end"),
            message="`suffix`",
        ),
        Case(
            "completions-stop-too-many",
            "POST",
            c,
            422,
            "validation",
            json=completion(stop=["a", "b", "c", "d"]),
        ),
        Case("completions-stop-string", "POST", c, 200, json=completion(stop="\n")),
        Case(
            "completions-temperature-nan",
            "POST",
            c,
            422,
            "validation",
            raw=b'{"prompt": "Hi", "temperature": NaN}',
        ),
        Case("completions-stream-ok", "POST", c, 200, json=completion(stream=True)),
        Case("chat-ok", "POST", ch, 200, json=chat()),
        Case(
            "chat-messages-empty",
            "POST",
            ch,
            422,
            "validation",
            json=chat([]),
            message="`messages` cannot be empty",
        ),
        Case(
            "chat-messages-missing",
            "POST",
            ch,
            422,
            "validation",
            json={"max_tokens": 4},
            message="`messages`",
        ),
        Case("chat-messages-string", "POST", ch, 422, "validation", json=chat("Hi"), message="`messages`"),
        Case(
            "chat-message-no-role",
            "POST",
            ch,
            422,
            "validation",
            json=chat([{"content": "Hi"}]),
            message="role",
        ),
        Case(
            "chat-role-number",
            "POST",
            ch,
            422,
            "validation",
            json=chat([{"role": 5, "content": "Hi"}]),
            message="role",
        ),
        Case("chat-role-unknown", "POST", ch, 200, json=chat([{"role": "wizard", "content": "Hi"}])),
        Case(
            "chat-content-number", "POST", ch, 422, "validation", json=chat([{"role": "user", "content": 42}])
        ),
        Case(
            "chat-content-object",
            "POST",
            ch,
            422,
            "validation",
            json=chat([{"role": "user", "content": {"a": 1}}]),
        ),
        Case(
            "chat-content-parts-not-objects",
            "POST",
            ch,
            422,
            "validation",
            json=chat([{"role": "user", "content": [1]}]),
        ),
        Case(
            "chat-content-parts",
            "POST",
            ch,
            200,
            json=chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]}]),
        ),
        Case(
            "chat-content-part-text-null",
            "POST",
            ch,
            422,
            "validation",
            json=chat([{"role": "user", "content": [{"type": "text", "text": None}]}]),
            message="must be a string",
        ),
        Case(
            "chat-content-part-text-number",
            "POST",
            ch,
            422,
            "validation",
            json=chat([{"role": "user", "content": [{"type": "text", "text": 5}]}]),
            message="must be a string",
        ),
        Case(
            "chat-model-missing",
            "POST",
            ch,
            200,
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        ),
        Case(
            "chat-top_logprobs-50",
            "POST",
            ch,
            422,
            "validation",
            json=chat(logprobs=True, top_logprobs=50),
            message="`top_logprobs`",
        ),
        Case(
            "chat-top_logprobs-negative",
            "POST",
            ch,
            422,
            "validation",
            json=chat(logprobs=True, top_logprobs=-1),
            message="`top_logprobs`",
        ),
        Case("chat-logprobs-number", "POST", ch, 422, "validation", json=chat(logprobs="all")),
        Case("chat-n-2-stream", "POST", ch, 422, "validation", json=chat(n=2, stream=True), message="`n`"),
        Case(
            "chat-max_completion_tokens-zero",
            "POST",
            ch,
            422,
            "validation",
            json=chat(max_completion_tokens=0),
        ),
        Case(
            "chat-tools",
            "POST",
            ch,
            422,
            "validation",
            json=chat(tools=[{"type": "function"}]),
            message="`tools`",
        ),
        Case(
            "chat-response_format-json",
            "POST",
            ch,
            422,
            "validation",
            json=chat(response_format={"type": "json_object"}),
            message="`response_format`",
        ),
        Case(
            "chat-too-long",
            "POST",
            ch,
            422,
            "validation",
            json=chat([{"role": "user", "content": LONG}]),
            message="at most 64 tokens",
        ),
        Case(
            "chat-lone-surrogate",
            "POST",
            ch,
            422,
            "validation",
            raw=b'{"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',
        ),
        Case(
            "chat-stream-ok", "POST", ch, 200, json=chat(stream=True, stream_options={"include_usage": True})
        ),
        Case(
            "chat-stream_options-wrong",
            "POST",
            ch,
            422,
            "validation",
            json=chat(stream=True, stream_options=5),
        ),
    ]


def _other_route_cases() -> list[Case]:
    t = "/tokenize"
    return [
        Case("tokenize-ok", "POST", t, 200, json={"inputs": TEXT}),
        Case("tokenize-inputs-number", "POST", t, 422, "validation", json={"inputs": 42}, message="`inputs`"),
        Case("tokenize-inputs-missing", "POST", t, 422, "validation", json={}, message="`inputs`"),
        Case(
            "tokenize-add_special_tokens-word",
            "POST",
            t,
            422,
            "validation",
            json={"inputs": TEXT, "add_special_tokens": "maybe"},
        ),
        Case("tokenize-nul", "POST", t, 200, json={"inputs": "a\u0000b"}),
        Case("tokenize-lone-surrogate", "POST", t, 422, "validation", raw=b'{"inputs": "a\\ud800"}'),
        # /tokenize has no token limit (as LoRAX: it is how clients count tokens); the payload limit bounds it.
        Case("tokenize-1MB", "POST", t, 200, json={"inputs": "a" * 1_000_000}, max_seconds=15.0),
        Case("health-ok", "GET", "/health", 200),
        Case("info-ok", "GET", "/info", 200),
        Case("metrics-ok", "GET", "/metrics", 200),
        Case("health-post", "POST", "/health", 405, "method_not_allowed", json={}),
        Case("info-post", "POST", "/info", 405, "method_not_allowed", json={}),
        Case("metrics-delete", "DELETE", "/metrics", 405, "method_not_allowed"),
        Case("generate-get", "GET", "/generate", 405, "method_not_allowed"),
        Case("completions-put", "PUT", "/v1/completions", 405, "method_not_allowed", json=completion()),
        Case("tokenize-get", "GET", "/tokenize", 405, "method_not_allowed"),
        Case("unknown-route-get", "GET", "/nope", 404, "not_found"),
        Case("unknown-route-post", "POST", "/v1/nope", 404, "not_found", json={}),
        Case("unknown-route-traversal", "GET", "/..%2f..%2fetc/passwd", 404, "not_found"),
    ]


CASES: list[Case] = [
    *_body_cases(),
    *_inputs_cases(),
    *_parameter_cases(),
    *_adapter_cases(),
    *_openai_cases(),
    *_other_route_cases(),
]
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"

MESSAGE_PREFIX = {
    "validation": "Input validation error: ",
    "generation": "Request failed during generation: ",
}


@pytest.fixture(scope="module")
def http(robust_url):
    with httpx.Client(base_url=robust_url, timeout=60) as c:
        yield c


def send(http: httpx.Client, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if case.raw is not None:
        content = case.raw
        headers.setdefault("content-type", "application/json")
    elif case.json is not _NO_BODY:
        content = json.dumps(case.json).encode()
        headers.setdefault("content-type", "application/json")
    else:
        content = None
    if headers.get("content-type") == "":
        del headers["content-type"]  # no content type at all
    return http.request(case.method, case.path, content=content, headers=headers)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(http, case: Case):
    record("bad_inputs", tried=1, server_errors_500=0)
    started = time.monotonic()
    r = send(http, case)
    elapsed = time.monotonic() - started
    record("bad_inputs", server_errors_500=int(r.status_code >= 500))
    _check(case, r, elapsed)
    record("bad_inputs", answered_correctly=1)


def _check(case: Case, r: httpx.Response, elapsed: float) -> None:
    assert r.status_code == case.status, f"{r.status_code}: {r.text[:500]}"
    assert elapsed < case.max_seconds, f"answered in {elapsed:.1f}s"
    if case.error_type is None:
        check_success(case, r)
        return
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    body = r.json()
    assert set(body) == {"error", "error_type"}, body
    assert isinstance(body["error"], str) and body["error"], body
    assert body["error_type"] == case.error_type, body
    assert body["error"].startswith(MESSAGE_PREFIX.get(case.error_type, "")), body
    if case.message is not None:
        assert case.message in body["error"], body


def check_success(case: Case, r: httpx.Response) -> None:
    content_type = r.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        events = [line for line in r.text.splitlines() if line.startswith("data:")]
        assert events, r.text
        assert not any('"error_type"' in e for e in events), r.text
    elif case.path == "/metrics":
        assert "gorgon" in r.text or "# HELP" in r.text
    elif case.path == "/health":
        assert r.text == ""
    else:
        body = r.json()
        if case.path == "/":
            assert isinstance(body, list) and isinstance(body[0]["generated_text"], str)
        elif case.path == "/generate":
            assert isinstance(body["generated_text"], str)
        elif case.path.startswith("/v1/"):
            assert body["choices"], body
        elif case.path == "/tokenize":
            assert isinstance(body, list)
        elif case.path == "/info":
            assert body["max_input_length"] == 64 and body["max_total_tokens"] == 128


def test_catalogue_size():
    assert len(CASES) >= 60
    routes = {c.path for c in CASES}
    assert set(POST_ROUTES) | {"/health", "/info", "/metrics"} <= routes


def test_server_still_serves_after_catalogue(http, robust_engine):
    """Runs after the catalogue (file order): nothing above broke the engine or leaked a request slot."""
    r = http.post("/generate", json={"inputs": TEXT, "parameters": {"max_new_tokens": 8, "details": True}})
    assert r.status_code == 200, r.text
    assert r.json()["details"]["generated_tokens"] >= 1
    assert http.get("/health").status_code == 200
    stats = robust_engine.stats()
    assert stats.running == 0 and stats.queue_length == 0
    assert robust_engine._in_flight == 0
    record("bad_inputs", served_normally_after=True)


def test_chunked_body_over_payload_limit(http):
    """A body with no Content-Length (chunked) is cut off once it passes the limit, with the LoRAX body."""

    def chunks():
        for _ in range(30):
            yield b"x" * 100_000

    r = http.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error_type"] == "validation" and "payload limit" in r.json()["error"]


def test_method_not_allowed_keeps_allow_header(http):
    r = http.get("/generate")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_openapi_documents_the_error_body(http):
    """The schema declares the error body the server sends, not FastAPI's `{"detail": [...]}`."""
    paths = http.get("/openapi.json").json()["paths"]
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in POST_ROUTES:
        responses = paths[path]["post"]["responses"]
        assert responses["422"]["content"]["application/json"]["schema"] == ref, path
    assert paths["/generate"]["post"]["responses"]["424"]["content"]["application/json"]["schema"] == ref
