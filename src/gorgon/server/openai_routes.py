"""OpenAI-compatible routes: `/v1/completions` and `/v1/chat/completions`, whole or streamed.

Requests are mapped onto LoRAX parameters and validated by the same rules. As in LoRAX, sampling is off
unless a sampling parameter is set. Unlike LoRAX answers, OpenAI text never shows the stop sequence.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gorgon.engine.request import FinalOutput, TokenOutput
from gorgon.errors import IncompleteGenerationError, ValidationError
from gorgon.server import openai_schemas as o
from gorgon.server.generation import (
    ClientDisconnected,
    cancel_on_disconnect,
    error_from_output,
    generate_best_of,
    open_stream,
)
from gorgon.server.lorax_routes import CLIENT_CLOSED_STATUS, response_headers
from gorgon.server.metrics import ServerMetrics
from gorgon.server.schemas import GENERATION_ERRORS, Parameters
from gorgon.server.stream import OPENAI_DONE, StopTextFilter, apply_stop_filter, guarded, sse, sse_response
from gorgon.server.validation import MAX_ALTERNATIVES, ValidatedRequest, validate_request


def _parameters(
    body: o.OpenAIRequestBase, *, max_new_tokens: int | None, top_n: int | None, **extra: Any
) -> Parameters:
    if body.n is not None and body.n < 1:
        raise ValidationError("`n` must be strictly positive")
    if body.n not in (None, 1):
        raise ValidationError("`n` > 1 is not supported: send several requests")
    return Parameters(
        adapter_id=body.model,
        adapter_source=body.adapter_source,
        api_token=body.api_token,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        max_new_tokens=max_new_tokens,
        ignore_eos_token=body.ignore_eos_token,
        stop=body.stop_list,
        seed=body.seed,
        details=True,
        return_k_alternatives=top_n,
        **extra,
    )


def completion_inputs(body: o.CompletionRequest) -> tuple[str, Parameters]:
    """The prompt and LoRAX parameters of a `/v1/completions` request (raises ValidationError)."""
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ValidationError("`prompt` must be one string (batches are not supported)")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    if body.suffix:
        raise ValidationError("`suffix` is not supported")
    _check_alternatives("logprobs", body.logprobs)
    return prompt, _parameters(
        body, max_new_tokens=body.max_tokens, top_n=body.logprobs, best_of=body.best_of
    )


def chat_inputs(body: o.ChatCompletionRequest) -> tuple[str, Parameters]:
    """The messages (as the JSON `inputs` the chat template reads) and LoRAX parameters of a
    `/v1/chat/completions` request (raises ValidationError)."""
    if body.tools:
        raise ValidationError("`tools` is not supported")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise ValidationError("`response_format` other than text is not supported")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    _check_alternatives("top_logprobs", body.top_logprobs)
    top_n = body.top_logprobs if body.logprobs else None
    max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _parameters(body, max_new_tokens=max_new, top_n=top_n, apply_chat_template=True)
    return json.dumps(messages), params


def _check_alternatives(name: str, value: int | None) -> None:
    # Checked under the OpenAI name: the LoRAX rule would speak of `return_k_alternatives`.
    if value is not None and not 0 <= value <= MAX_ALTERNATIVES:
        raise ValidationError(f"`{name}` must be >= 0 and <= {MAX_ALTERNATIVES}. Given: {value}")


def _finish_reason(final: FinalOutput) -> str:
    return "length" if final.finish_reason == "length" else "stop"


def _usage(final: FinalOutput) -> o.Usage:
    return o.Usage(
        prompt_tokens=final.prompt_tokens,
        completion_tokens=final.generated_tokens,
        total_tokens=final.prompt_tokens + final.generated_tokens,
    )


def _answer_tokens(tokens: list[TokenOutput], text_len: int) -> list[tuple[int, TokenOutput]]:
    """(offset, token) of the text tokens that begin inside the answer (a stop sequence may cut it short)."""
    kept, offset = [], 0
    for t in tokens:
        if t.special:
            continue
        if offset >= text_len:
            break
        kept.append((offset, t))
        offset += len(t.text)
    return kept


def _completion_logprobs(
    kept: list[tuple[int, TokenOutput]], top: bool, offset0: int
) -> o.CompletionLogprobs:
    return o.CompletionLogprobs(
        tokens=[t.text for _, t in kept],
        token_logprobs=[t.logprob for _, t in kept],
        top_logprobs=[{a.text: a.logprob for a in t.alternatives} for _, t in kept] if top else None,
        text_offset=[offset0 + off for off, _ in kept],
    )


def _chat_logprob(t: TokenOutput) -> o.ChatTokenLogprob:
    return o.ChatTokenLogprob(
        token=t.text,
        logprob=t.logprob,
        bytes=list(t.text.encode()),
        top_logprobs=[
            o.TopLogprob(token=a.text, logprob=a.logprob, bytes=list(a.text.encode())) for a in t.alternatives
        ],
    )


def build_openai_router(engine: Any, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"], responses=GENERATION_ERRORS)

    def validate(inputs: str, params: Parameters, stream: bool) -> ValidatedRequest:
        return validate_request(
            inputs,
            params,
            tokenizer=engine.tokenizer,
            config=engine.config,
            model_id=engine.model_id,
            stream=stream,
        )

    async def run(http_request: Request, v: ValidatedRequest):
        started = time.perf_counter()
        best, others = await cancel_on_disconnect(
            http_request, generate_best_of(engine, v, lambda: metrics.first_token(started))
        )
        for c in (best, *others):
            metrics.finished(c.final.generated_tokens)
        return best

    async def stream_events(
        http_request: Request,
        v: ValidatedRequest,
        opening: Any,
        chunk: Callable[..., Any],
        include_usage: bool,
    ) -> Response:
        """Stream `opening` (if any), `chunk(text, token, finish_reason)` events, the usage, and `[DONE]`."""
        started = time.perf_counter()
        stream = await cancel_on_disconnect(
            http_request, open_stream(engine, v.request, lambda: metrics.first_token(started))
        )

        async def events() -> AsyncIterator[bytes]:
            stops = StopTextFilter(v.request.stopping.stop_sequences)
            if opening is not None:
                yield sse(opening, space=True)
            final = None
            streamed = ""  # token texts as the engine sent them
            async for out in stream:
                if isinstance(out, TokenOutput):
                    streamed += "" if out.special else out.text
                    text = stops.push("" if out.special else out.text)
                    if text or (v.request.top_n_tokens and not out.special and not stops.stopped):
                        yield sse(chunk(text, out, None), space=True)
                elif isinstance(out, FinalOutput):
                    final = out
                    metrics.finished(out.generated_tokens)
                    # Text the tokens did not carry (bytes of a character left incomplete at the end) is in
                    # the final text: send it too, so the stream adds up to the non-streamed answer.
                    full = out.generated_text
                    tail = full[len(streamed) :] if full.startswith(streamed) else ""
                    text = stops.push(tail) + stops.finish()
                    yield sse(chunk(text, None, _finish_reason(out)), space=True)
                    if include_usage:
                        usage = chunk("", None, None).model_copy(update={"choices": [], "usage": _usage(out)})
                        yield sse(usage, space=True)
                else:
                    raise error_from_output(out)
            if final is None:
                raise IncompleteGenerationError("the engine ended the request without a final output")
            yield OPENAI_DONE

        headers = response_headers(engine, v)
        return sse_response(guarded(stream, events(), space=True), headers)

    @router.post(
        "/completions", summary="OpenAI completions", responses={200: {"model": o.CompletionResponse}}
    )
    async def completions(http_request: Request, body: o.CompletionRequest) -> Response:
        prompt, params = completion_inputs(body)
        want_logprobs = body.logprobs is not None
        v = validate(prompt, params, stream=bool(body.stream))
        cid, created, model = f"cmpl-{v.request.request_id}", int(time.time()), body.model or engine.model_id
        echo = prompt if body.echo else ""
        try:
            if body.stream:

                def chunk(text: str, token: TokenOutput | None, finish: str | None) -> o.CompletionChunk:
                    logprobs = None
                    if want_logprobs and token is not None:
                        logprobs = _completion_logprobs([(0, token)], body.logprobs > 0, 0)
                    choice = o.CompletionChoice(text=text, logprobs=logprobs, finish_reason=finish)
                    return o.CompletionChunk(id=cid, created=created, model=model, choices=[choice])

                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                opening = chunk(echo, None, None) if echo else None
                return await stream_events(http_request, v, opening, chunk, include_usage)
            best = await run(http_request, v)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_STATUS)
        text = apply_stop_filter(best.final.generated_text, v.request.stopping.stop_sequences)
        logprobs = None
        if want_logprobs:
            logprobs = _completion_logprobs(
                _answer_tokens(best.tokens, len(text)), body.logprobs > 0, len(echo)
            )
        choice = o.CompletionChoice(
            text=echo + text, logprobs=logprobs, finish_reason=_finish_reason(best.final)
        )
        answer = o.CompletionResponse(
            id=cid, created=created, model=model, choices=[choice], usage=_usage(best.final)
        )
        headers = response_headers(engine, v, best.final)
        return Response(answer.model_dump_json(), media_type="application/json", headers=headers)

    @router.post(
        "/chat/completions",
        summary="OpenAI chat completions",
        responses={200: {"model": o.ChatCompletionResponse}},
    )
    async def chat_completions(http_request: Request, body: o.ChatCompletionRequest) -> Response:
        inputs, params = chat_inputs(body)
        v = validate(inputs, params, stream=bool(body.stream))
        cid, created, model = (
            f"chatcmpl-{v.request.request_id}",
            int(time.time()),
            body.model or engine.model_id,
        )
        try:
            if body.stream:

                def chunk(text: str, token: TokenOutput | None, finish: str | None) -> o.ChatCompletionChunk:
                    logprobs = (
                        o.ChatLogprobs(content=[_chat_logprob(token)]) if body.logprobs and token else None
                    )
                    choice = o.ChatChunkChoice(
                        delta=o.Delta(content=text or None), logprobs=logprobs, finish_reason=finish
                    )
                    return o.ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice])

                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                opening = o.ChatCompletionChunk(
                    id=cid,
                    created=created,
                    model=model,
                    choices=[o.ChatChunkChoice(delta=o.Delta(role="assistant", content=""))],
                )
                return await stream_events(http_request, v, opening, chunk, include_usage)
            best = await run(http_request, v)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_STATUS)
        text = apply_stop_filter(best.final.generated_text, v.request.stopping.stop_sequences)
        logprobs = None
        if body.logprobs:
            logprobs = o.ChatLogprobs(
                content=[_chat_logprob(t) for _, t in _answer_tokens(best.tokens, len(text))]
            )
        choice = o.ChatChoice(
            message=o.AssistantMessage(content=text),
            logprobs=logprobs,
            finish_reason=_finish_reason(best.final),
        )
        answer = o.ChatCompletionResponse(
            id=cid, created=created, model=model, choices=[choice], usage=_usage(best.final)
        )
        headers = response_headers(engine, v, best.final)
        return Response(answer.model_dump_json(), media_type="application/json", headers=headers)

    return router
