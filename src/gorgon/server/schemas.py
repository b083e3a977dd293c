"""Wire models of the LoRAX API (requests, responses, stream events, errors, `/info`, `/tokenize`).

Field names and shapes follow /work/shared/spec/lorax-api.md. Every request field is optional and accepts
`null`, because `lorax-client` sends every key with `null` for the unset ones: `null` means "default".
Unknown keys are ignored, as LoRAX does, so newer clients keep working. NaN and infinities (which Python's
JSON parser reads from `NaN`, `Infinity`, `1e999`) are refused: they would slip past every range check.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["length", "eos_token", "stop_sequence"]


def _omit(value: Any) -> bool:
    return value is None


class Parameters(BaseModel):
    """LoRAX generation parameters; checked in `gorgon.server.validation`, not here, for LoRAX messages."""

    # NaN compares false with every bound, so `temperature: NaN` would pass `< 0` and sample garbage.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    adapter_id: str | None = None
    adapter_source: str | None = None  # hub | local | s3 | pbase
    api_token: str | None = None
    merged_adapters: dict[str, Any] | None = None
    best_of: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    max_new_tokens: int | None = None
    ignore_eos_token: bool | None = None
    return_full_text: bool | None = None
    stop: list[str] | None = None
    truncate: int | None = None
    watermark: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    return_k_alternatives: int | None = None
    seed: int | None = None
    response_format: dict[str, Any] | None = None
    # When true, `inputs` is a JSON list of chat messages (or a plain user message) rendered by the template.
    apply_chat_template: bool | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    inputs: str
    parameters: Parameters | None = None
    # Only read by `POST /`; `/generate` and `/generate_stream` decide by their path.
    stream: bool | None = None


class TokenizeRequest(BaseModel):
    inputs: str
    add_special_tokens: bool | None = None


class SimpleToken(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class AlternativeToken(BaseModel):
    id: int
    text: str
    logprob: float


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None
    special: bool
    skipped: bool = False
    alternative_tokens: list[AlternativeToken] | None = Field(default=None, exclude_if=_omit)


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None  # None for the first prompt token


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    skipped_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]


class Details(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] | None = Field(default=None, exclude_if=_omit)


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = Field(default=None, exclude_if=_omit)


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int
    seed: int | None


class StreamResponse(BaseModel):
    """One SSE event: a token; the last one also carries the whole text and (with `details`) the details."""

    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


class ErrorResponse(BaseModel):
    error: str
    error_type: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses
    }


_ERROR_DESCRIPTIONS = {
    413: "The request body is over the payload limit (`error_type` validation)",
    422: "Input validation error (`error_type` validation)",
    424: "Request failed during generation, e.g. an adapter that cannot be loaded (`error_type` generation)",
    429: "Model is overloaded (`error_type` overloaded)",
    500: "Incomplete generation (`error_type` incomplete_generation)",
    503: "The engine is not ready (`error_type` healthcheck)",
}
# Declared in the OpenAPI schema instead of FastAPI's `{"detail": [...]}` 422, which this server never sends.
REQUEST_ERRORS = _errors(413, 422)
GENERATION_ERRORS = _errors(413, 422, 424, 429, 500)
HEALTH_ERRORS = _errors(503)


class Info(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_length: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    version: str
    sha: str | None = None
    docker_label: str | None = None
    # Number of tokens proposed per step by speculation (Medusa heads or n-gram); 0: none yet.
    speculate: int = 0
    adapter_id: str | None = None
    supports_generation: bool = True
    supports_embeddings: bool = False
    supports_classification: bool = False
    chat_template: str | None = None
