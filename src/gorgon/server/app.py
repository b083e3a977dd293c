"""The FastAPI application: LoRAX and OpenAI routes, `/tokenize`, `/health`, `/info`, `/metrics`, `/docs`.

`create_app(engine)` does not start or stop the engine: the caller owns its lifecycle (`engine.start()`
before serving, `engine.shutdown()` after), so tests and the CLI can share one engine across apps.
Every error answers `{"error": message, "error_type": type}` with the status of its type.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from gorgon import __version__
from gorgon.errors import GorgonError, ValidationError
from gorgon.server import schemas as s
from gorgon.server.lorax_routes import build_lorax_router
from gorgon.server.metrics import MetricsMiddleware, ServerMetrics
from gorgon.server.openai_routes import build_openai_router

log = logging.getLogger(__name__)


def create_app(engine: Any) -> FastAPI:
    """A FastAPI app serving `engine` (an `AsyncEngine`, or anything with its interface)."""
    app = FastAPI(
        title="Gorgon",
        version=__version__,
        description="LoRAX-compatible LLM inference server (OpenAI-compatible routes under /v1).",
        docs_url="/docs",
    )
    metrics = ServerMetrics(engine)
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _install_error_handlers(app)
    app.include_router(build_lorax_router(engine, metrics))
    app.include_router(build_openai_router(engine, metrics))

    # Async (on the event loop) like validation, so the tokenizer is never used from two server threads.
    @app.post("/tokenize", tags=["LoRAX"], summary="Tokenize inputs", response_model=list[s.SimpleToken])
    async def tokenize(body: s.TokenizeRequest) -> list[s.SimpleToken]:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        try:
            enc = engine.tokenizer(body.inputs, add_special_tokens=add_special, return_offsets_mapping=True)
        except NotImplementedError as e:  # slow (Python) tokenizers have no offsets
            raise ValidationError(f"this model's tokenizer cannot report offsets: {e}") from e
        return [
            # Special tokens added by the tokenizer have an empty (0, 0) span; show their text anyway.
            s.SimpleToken(
                id=i, text=body.inputs[a:b] if b > a else engine.tokenizer.decode([i]), start=a, stop=b
            )
            for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
        ]

    @app.get("/health", tags=["Ops"], summary="200 when the engine is ready, 503 otherwise")
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

    @app.get("/metrics", tags=["Ops"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    return app


def _error(status: int, message: str, error_type: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GorgonError)
    async def gorgon_error(_: Request, exc: GorgonError) -> JSONResponse:
        if exc.status_code >= 500:
            log.error("request failed: %s", exc.message)
        return _error(exc.status_code, exc.message, exc.error_type)

    @app.exception_handler(RequestValidationError)
    async def body_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # Malformed JSON or wrong types: answer as LoRAX does for any bad request.
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"`{loc}`: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
        err = ValidationError("; ".join(parts) or "invalid request body")
        return _error(err.status_code, err.message, err.error_type)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {exc}", "incomplete_generation")
