"""Server-sent events: formatting, a guard that turns failures into error events and always closes the
engine request, and the stop-sequence filter that keeps stop text out of OpenAI answers.

LoRAX writes `data:{json}` with no space; OpenAI writes `data: {json}` and ends with `data: [DONE]`.
Clients of both strip the prefix, so each endpoint uses its own convention.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse

from gorgon.errors import GorgonError, IncompleteGenerationError
from gorgon.server.generation import EngineStream

log = logging.getLogger(__name__)

OPENAI_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Cache-Control": "no-cache",
    # Proxies (nginx) would otherwise buffer the stream and deliver it at the end.
    "X-Accel-Buffering": "no",
}


def sse(data: BaseModel | Mapping[str, Any] | str, *, space: bool = False) -> bytes:
    """One SSE event: `data:{json}` (LoRAX) or `data: {json}` (OpenAI, `space=True`), then a blank line."""
    if isinstance(data, BaseModel):
        body = data.model_dump_json()
    elif isinstance(data, str):
        body = data
    else:
        body = json.dumps(data, ensure_ascii=False)
    return f"data:{' ' if space else ''}{body}\n\n".encode()


def error_event(err: GorgonError, *, space: bool = False) -> bytes:
    return sse({"error": err.message, "error_type": err.error_type}, space=space)


def sse_response(events: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
    )


async def guarded(
    stream: EngineStream, events: AsyncIterator[bytes], *, space: bool = False
) -> AsyncIterator[bytes]:
    """Relay `events` (built from `stream`); a failure becomes a last error event; the engine request is
    closed in every case, including the client disconnecting (Starlette then cancels this generator)."""
    try:
        async for event in events:
            yield event
    except GorgonError as e:
        yield error_event(e, space=space)
    except Exception as e:  # a bug must still end the stream in a way clients can read
        log.exception("stream failed")
        yield error_event(IncompleteGenerationError(f"stream failed: {e}"), space=space)
    finally:
        with anyio.CancelScope(shield=True):
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
        await stream.aclose()


class StopTextFilter:
    """Cuts generated text at the first stop sequence, holding back any tail that could begin one.

    Feed it token texts with `push`; what it returns is safe to send. `finish` releases the held tail when
    generation ended for another reason. The engine (LoRAX) keeps stop text; OpenAI answers must not.
    """

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self._pending[: min(hits)]
            self._pending, self.stopped = "", True
            return out
        keep = self._longest_stop_prefix_suffix()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def finish(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        """Length of the longest tail of the pending text that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best


def apply_stop_filter(text: str, stops: tuple[str, ...] | list[str]) -> str:
    """`text` up to (not including) its first stop sequence."""
    f = StopTextFilter(stops)
    return f.push(text) + f.finish()
