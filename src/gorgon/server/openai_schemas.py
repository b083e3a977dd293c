"""Wire models of the OpenAI-compatible endpoints (`/v1/completions`, `/v1/chat/completions`).

`model` names the adapter (empty or the base model id: none). LoRAX's extra fields (`repetition_penalty`,
`top_k`, `ignore_eos_token`, `adapter_source`, `api_token`) are accepted on both endpoints.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gorgon.errors import ValidationError


def _omit(value: Any) -> bool:
    return value is None


class StreamOptions(BaseModel):
    include_usage: bool | None = None


class OpenAIRequestBase(BaseModel):
    # No NaN nor infinities: they would pass every range check (see schemas.Parameters).
    model_config = ConfigDict(extra="ignore", protected_namespaces=(), allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    user: str | None = None
    # LoRAX extensions.
    repetition_penalty: float | None = None
    top_k: int | None = None
    ignore_eos_token: bool | None = None
    adapter_source: str | None = None
    api_token: str | None = None

    @property
    def stop_list(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop


class CompletionRequest(OpenAIRequestBase):
    prompt: str | list[str]
    echo: bool | None = None
    best_of: int | None = None
    logprobs: int | None = None  # number of alternatives to report per token
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    # A string, or a list of parts of which the text parts are used.
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = [part.get("text", "") for part in self.content if part.get("type", "text") == "text"]
        # The parts are free-form dicts: a text part whose `text` is not a string is the client's error (a 422),
        # not a TypeError in the join below (a 500).
        if not all(isinstance(t, str) for t in texts):
            raise ValidationError("`messages`: the `text` of a text content part must be a string")
        return "".join(texts)


class ChatCompletionRequest(OpenAIRequestBase):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_omit)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_omit)
    content: str | None = Field(default=None, exclude_if=_omit)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(default=None, exclude_if=_omit)


class CompletionChunk(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(default=None, exclude_if=_omit)
