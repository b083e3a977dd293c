"""The FastAPI application: LoRAX and OpenAI routes, `/tokenize`, `/health`, `/info`, `/metrics`, `/docs`.

`create_app(engine)` does not start or stop the engine: the caller owns its lifecycle (`engine.start()`
before serving, `engine.shutdown()` after), so tests and the CLI can share one engine across apps.
Every error answers `{"error": message, "error_type": type}` with the status of its type.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gorgon import __version__
from gorgon.errors import GorgonError, ValidationError
from gorgon.server import schemas as s
from gorgon.server.lorax_routes import build_lorax_router
from gorgon.server.metrics import MetricsMiddleware, ServerMetrics
from gorgon.server.openai_routes import build_openai_router
from gorgon.server.validation import check_text

log = logging.getLogger(__name__)

# LoRAX's `--payload-limit` default: a bigger body is refused (413) before it is parsed or tokenized, so one
# request cannot hold the event loop for seconds in the tokenizer nor fill the memory.
PAYLOAD_LIMIT = 2_000_000
# error_type of the HTTP errors that are not LoRAX's own (routes, methods, body size).
HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed"}


def create_app(engine: Any, *, payload_limit: int | None = PAYLOAD_LIMIT) -> FastAPI:
    """A FastAPI app serving `engine` (an `AsyncEngine`, or anything with its interface). Request bodies
    larger than `payload_limit` bytes are refused (None: no limit)."""
    app = FastAPI(
        title="Gorgon",
        version=__version__,
        description="LoRAX-compatible LLM inference server (OpenAI-compatible routes under /v1).",
        docs_url="/docs",
    )
    metrics = ServerMetrics(engine)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.payload_limit = payload_limit
    if payload_limit is not None:
        app.add_middleware(PayloadLimitMiddleware, limit=payload_limit)  # inside metrics: 413s are counted
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _install_error_handlers(app)
    app.include_router(build_lorax_router(engine, metrics))
    app.include_router(build_openai_router(engine, metrics))

    # Async (on the event loop) like validation, so the tokenizer is never used from two server threads.
    @app.post(
        "/tokenize",
        tags=["LoRAX"],
        summary="Tokenize inputs",
        responses={200: {"model": list[s.SimpleToken]}, **s.REQUEST_ERRORS},
    )
    async def tokenize(body: s.TokenizeRequest) -> Response:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        check_text("inputs", body.inputs)
        try:
            enc = engine.tokenizer(body.inputs, add_special_tokens=add_special, return_offsets_mapping=True)
        except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
            raise ValidationError(f"this model's tokenizer cannot report offsets: {e}") from e
        except Exception as e:  # tokenizers raise a zoo of types on odd input: the input's fault, not ours
            raise ValidationError(f"tokenizer error: {e}") from e
        special_text: dict[int, str] = {}

        def text(i: int, a: int, b: int) -> str:
            # Special tokens added by the tokenizer have an empty (0, 0) span; show their text anyway.
            if b > a:
                return body.inputs[a:b]
            if i not in special_text:
                special_text[i] = engine.tokenizer.decode([i])
            return special_text[i]

        # Plain dicts and one json.dumps, not a pydantic model per token: a long input (up to the payload
        # limit, a token per byte) would otherwise hold the event loop for seconds.
        tokens = [
            {"id": i, "text": text(i, a, b), "start": a, "stop": b}
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        return Response(json.dumps(tokens, ensure_ascii=False), media_type="application/json")

    @app.get(
        "/health",
        tags=["Ops"],
        summary="200 when the engine is ready, 503 otherwise",
        response_class=Response,  # documented as it is: 200 has an empty body, not JSON
        responses={200: {"description": "Ready (empty body)", "content": {}}, **s.HEALTH_ERRORS},
    )
    async def health() -> Response:
        if engine.healthy:
            return Response(status_code=200)
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)

    @app.get("/info", tags=["Ops"], summary="Model and limits", response_model=s.Info)
    async def info() -> s.Info:
        cfg = engine.config
        return s.Info(
            model_id=engine.model_id,
            model_dtype=str(engine.dtype),
            model_device_type=engine.device.type,
            max_concurrent_requests=cfg.max_concurrent_requests,
            max_best_of=cfg.max_best_of,
            max_stop_sequences=cfg.max_stop_sequences,
            max_input_length=cfg.max_input_length,
            max_total_tokens=cfg.max_total_tokens,
            max_batch_prefill_tokens=cfg.max_batch_prefill_tokens,
            max_batch_total_tokens=cfg.max_batch_total_tokens,
            version=__version__,
            speculate=getattr(engine, "speculate", 0),  # speculative tokens per step (LoRAX's field)
            adapter_id=getattr(engine, "adapter_id", None),
            chat_template=getattr(engine.tokenizer, "chat_template", None),
        )

    @app.get("/metrics", tags=["Ops"], summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


class PayloadLimitMiddleware:
    """Refuses request bodies over `limit` bytes with a LoRAX error body (413): at once when Content-Length
    says so, else when the body read so far passes the limit. (Starlette's own limit answers plain text.)"""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # An HTTPException: FastAPI passes it on from the body read to the handler below.
                    raise StarletteHTTPException(413)
            return message

        await self.app(scope, limited_receive, send)


def _too_large(limit: int | None) -> JSONResponse:
    limit_text = f"{limit} bytes" if limit is not None else "the limit"
    err = ValidationError(f"the request body is larger than {limit_text} (the payload limit)")
    return _error(413, err.message, err.error_type)


def _error(status: int, message: str, error_type: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # A message may quote the request (an adapter id, a path): a lone surrogate in it would make the JSON
    # body unencodable (and the answer a 500), so such characters are written as escapes.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def _body_message(request: Request, err: dict[str, Any]) -> str:
    """What is wrong with a request body that is not a JSON object at all."""
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "invalid JSON")
        loc = [x for x in err.get("loc", ()) if isinstance(x, int)]
        return f"the request body is not valid JSON: {reason}" + (f" (position {loc[0]})" if loc else "")
    if err.get("type") == "missing":
        return "the request body is empty: send a JSON object"
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type.lower():
        # FastAPI reads a body as JSON only when it says so (a CSRF guard); say so instead of "not an object".
        given = f"`{content_type}`" if content_type else "none"
        return f"the request body must be JSON sent with `Content-Type: application/json` (given: {given})"
    return f"the request body must be a JSON object: {err.get('msg', 'invalid')}"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GorgonError)
    async def gorgon_error(_: Request, exc: GorgonError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("request failed: %s", exc.message)
        return _error(exc.status_code, exc.message, exc.error_type)

    @app.exception_handler(RequestValidationError)
    async def body_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Malformed JSON or wrong types: answer as LoRAX does for any bad request.
        parts = []
        for err in exc.errors():
            loc = tuple(err.get("loc", ()))
            if loc[:1] == ("body",) and (len(loc) == 1 or err.get("type") == "json_invalid"):
                parts.append(_body_message(request, err))
                continue
            dotted = ".".join(str(x) for x in loc if x != "body")
            parts.append(
                f"`{dotted}`: {err.get('msg', 'invalid')}" if dotted else str(err.get("msg", "invalid"))
            )
        err = ValidationError("; ".join(parts) or "invalid request body")
        return _error(err.status_code, err.message, err.error_type)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette/FastAPI's own errors answer `{"detail": ...}`; every answer here has the LoRAX error body.
        if exc.status_code == 400:
            # FastAPI's "error parsing the body": bytes that are not UTF-8, JSON nested too deep for the
            # parser. As malformed JSON, a validation error.
            err = ValidationError("the request body is not valid JSON (it cannot be decoded as UTF-8 JSON)")
            return _error(err.status_code, err.message, err.error_type)
        if exc.status_code == 413:
            return _too_large(getattr(request.app.state, "payload_limit", None))
        message = f"{exc.detail}: {request.method} {request.url.path}"
        error_type = HTTP_ERROR_TYPES.get(exc.status_code, "http_error")
        return _error(exc.status_code, message, error_type, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {exc}", "incomplete_generation")
