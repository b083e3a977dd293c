"""The LoRAX generation routes: `POST /` (what `lorax-client` calls), `/generate` and `/generate_stream`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gorgon.engine.request import FinalOutput, TokenOutput
from gorgon.server import schemas as s
from gorgon.server.generation import (
    ClientDisconnected,
    Completion,
    EngineStream,
    cancel_on_disconnect,
    error_from_output,
    generate_best_of,
    open_stream,
)
from gorgon.server.metrics import ServerMetrics
from gorgon.server.stream import guarded, sse, sse_response
from gorgon.server.validation import ValidatedRequest, validate_request

log = logging.getLogger(__name__)

# nginx's "client closed request": logged and counted, never seen by the (gone) client.
CLIENT_CLOSED_STATUS = 499
_ID_SAFE = "/:@._-+~"


def token_model(t: TokenOutput, alternatives: bool) -> s.Token:
    alts = [s.AlternativeToken(id=a.id, text=a.text, logprob=a.logprob) for a in t.alternatives]
    return s.Token(
        id=t.id,
        text=t.text,
        logprob=t.logprob,
        special=t.special,
        skipped=t.skipped,
        alternative_tokens=alts if alternatives else None,
    )


def generated_text(v: ValidatedRequest, final: FinalOutput) -> str:
    return v.inputs + final.generated_text if v.return_full_text else final.generated_text


def response_headers(engine: Any, v: ValidatedRequest, final: FinalOutput | None = None) -> dict[str, str]:
    # Header values must be latin-1: ids are ASCII in practice, but a local path need not be.
    headers = {
        "x-model-id": quote(engine.model_id, safe=_ID_SAFE),
        "x-adapter-id": quote(v.request.adapter_id or engine.model_id, safe=_ID_SAFE),
    }
    if final is not None:
        headers |= {
            "x-prompt-tokens": str(final.prompt_tokens),
            "x-generated-tokens": str(final.generated_tokens),
            "x-skipped-tokens": str(final.skipped_tokens),
            "x-total-tokens": str(final.prompt_tokens + final.generated_tokens),
        }
    return headers


def build_response(v: ValidatedRequest, best: Completion, others: list[Completion]) -> s.GenerateResponse:
    if not v.details:
        return s.GenerateResponse(generated_text=generated_text(v, best.final))
    alternatives = v.request.top_n_tokens > 0

    def prefill(c: Completion) -> list[s.PrefillToken]:
        if not v.decoder_input_details:
            return []
        return [s.PrefillToken(id=p.id, text=p.text, logprob=p.logprob) for p in c.final.prefill]

    best_of = [
        s.BestOfSequence(
            generated_text=generated_text(v, c.final),
            finish_reason=c.final.finish_reason,
            generated_tokens=c.final.generated_tokens,
            skipped_tokens=c.final.skipped_tokens,
            seed=c.final.seed,
            prefill=prefill(c),
            tokens=[token_model(t, alternatives) for t in c.tokens],
        )
        for c in others
    ]
    f = best.final
    details = s.Details(
        finish_reason=f.finish_reason,
        prompt_tokens=f.prompt_tokens,
        generated_tokens=f.generated_tokens,
        skipped_tokens=f.skipped_tokens,
        seed=f.seed,
        prefill=prefill(best),
        tokens=[token_model(t, alternatives) for t in best.tokens],
        best_of_sequences=best_of or None,
    )
    return s.GenerateResponse(generated_text=generated_text(v, f), details=details)


async def lorax_events(
    stream: EngineStream, v: ValidatedRequest, metrics: ServerMetrics
) -> AsyncIterator[bytes]:
    """One event per token; the last token's event also carries the text and the details.

    The engine marks the last token (`finish_reason`) and sends the final output right after it: that token
    waits for the final output; every other token is sent at once.
    """
    alternatives = v.request.top_n_tokens > 0
    held: TokenOutput | None = None
    last: TokenOutput | None = None
    async for out in stream:
        if isinstance(out, TokenOutput):
            if held is not None:
                yield sse(s.StreamResponse(token=token_model(held, alternatives)))
                held = None
            last = out
            if out.finish_reason is not None:
                held = out
            else:
                yield sse(s.StreamResponse(token=token_model(out, alternatives)))
        elif isinstance(out, FinalOutput):
            metrics.finished(out.generated_tokens)
            if held is None:
                if last is None:
                    continue  # nothing generated: LoRAX has no token-less event to carry the text
                # An engine that did not mark its last token: carry the text and details on an empty
                # special token rather than lose them.
                log.warning("request ended on a token not foreseen as last; closing with an empty token")
                held = TokenOutput(id=last.id, text="", logprob=0.0, special=True, skipped=True)
            details = None
            if v.details:
                details = s.StreamDetails(
                    finish_reason=out.finish_reason,
                    prompt_tokens=out.prompt_tokens,
                    generated_tokens=out.generated_tokens,
                    skipped_tokens=out.skipped_tokens,
                    seed=out.seed,
                )
            event = s.StreamResponse(
                token=token_model(held, alternatives), generated_text=generated_text(v, out), details=details
            )
            held = None
            yield sse(event)
        else:
            if held is not None:
                yield sse(s.StreamResponse(token=token_model(held, alternatives)))
                held = None
            raise error_from_output(out)


def build_lorax_router(engine: Any, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter(tags=["LoRAX"], responses=s.GENERATION_ERRORS)

    def validate(body: s.GenerateRequest, stream: bool) -> ValidatedRequest:
        return validate_request(
            body.inputs,
            body.parameters,
            tokenizer=engine.tokenizer,
            config=engine.config,
            model_id=engine.model_id,
            stream=stream,
        )

    async def generate(http_request: Request, body: s.GenerateRequest) -> tuple[s.GenerateResponse, dict]:
        v = validate(body, stream=False)
        started = time.perf_counter()
        best, others = await cancel_on_disconnect(
            http_request, generate_best_of(engine, v, lambda: metrics.first_token(started))
        )
        for c in (best, *others):
            metrics.finished(c.final.generated_tokens)
        return build_response(v, best, others), response_headers(engine, v, best.final)

    async def generate_stream(http_request: Request, body: s.GenerateRequest) -> Response:
        v = validate(body, stream=True)
        started = time.perf_counter()
        stream = await cancel_on_disconnect(
            http_request, open_stream(engine, v.request, lambda: metrics.first_token(started))
        )
        return sse_response(
            guarded(stream, lorax_events(stream, v, metrics)),
            response_headers(engine, v),
        )

    @router.post(
        "/",
        summary="Generate (LoRAX compat route): a JSON list with one answer, or SSE with stream=true",
        responses={200: {"model": list[s.GenerateResponse]}},
    )
    async def compat_generate(http_request: Request, body: s.GenerateRequest) -> Response:
        try:
            if body.stream:
                return await generate_stream(http_request, body)
            response, headers = await generate(http_request, body)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_STATUS)
        return Response(f"[{response.model_dump_json()}]", media_type="application/json", headers=headers)

    @router.post("/generate", summary="Generate text", responses={200: {"model": s.GenerateResponse}})
    async def generate_route(http_request: Request, body: s.GenerateRequest) -> Response:
        try:
            response, headers = await generate(http_request, body)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_STATUS)
        return Response(response.model_dump_json(), media_type="application/json", headers=headers)

    @router.post(
        "/generate_stream",
        summary="Generate text as server-sent events",
        responses={200: {"content": {"text/event-stream": {}}, "model": s.StreamResponse}},
    )
    async def generate_stream_route(http_request: Request, body: s.GenerateRequest) -> Response:
        try:
            return await generate_stream(http_request, body)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_STATUS)

    return router
