"""Run validated requests on the engine: whole answers, best-of-n, and streams that are always closed.

Closing matters: the engine aborts a request (and frees its KV) when its output generator is closed, so
every path here, including a client that disconnects, ends by closing what it opened.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import anyio
from starlette.requests import Request

from gorgon.engine.request import ErrorOutput, FinalOutput, GenerationRequest, TokenOutput
from gorgon.errors import GorgonError, IncompleteGenerationError
from gorgon.server.validation import ValidatedRequest

T = TypeVar("T")
Output = TokenOutput | FinalOutput | ErrorOutput
STATUS_BY_ERROR_TYPE = {"validation": 422, "generation": 424, "overloaded": 429, "incomplete_generation": 500}


class ClientDisconnected(Exception):
    """The HTTP client went away before its answer was ready; the work was cancelled."""


def error_from_output(out: ErrorOutput) -> GorgonError:
    err = GorgonError(out.message)
    err.error_type = out.error_type
    err.status_code = STATUS_BY_ERROR_TYPE.get(out.error_type, 500)
    return err


@dataclass
class Completion:
    final: FinalOutput
    tokens: list[TokenOutput]

    @property
    def logprob_sum(self) -> float:
        return sum(t.logprob for t in self.tokens)


class EngineStream:
    """An admitted engine request: its first output has arrived, the rest follow; `aclose()` aborts it."""

    def __init__(self, outputs: AsyncIterator[Output], first: Output) -> None:
        self._outputs = outputs
        self._first: Output | None = first

    async def __aiter__(self) -> AsyncIterator[Output]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for out in self._outputs:
            yield out

    async def aclose(self) -> None:
        await _close(self._outputs)


async def _close(outputs: AsyncIterator[Output]) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        # Shielded: this often runs while the request's task is being cancelled (client gone).
        with anyio.CancelScope(shield=True):
            await aclose()


async def open_stream(
    engine: Any, request: GenerationRequest, on_first_token: Callable[[], None] | None = None
) -> EngineStream:
    """Submit `request` and wait for its first output, so that admission failures (overloaded, a bad
    adapter) raise here and become HTTP errors rather than events in an already-started stream."""
    outputs = engine.generate(request)
    try:
        first = await anext(outputs)
    except StopAsyncIteration:
        raise IncompleteGenerationError("the engine ended the request without any output") from None
    except BaseException:
        await _close(outputs)
        raise
    if isinstance(first, ErrorOutput):
        await _close(outputs)
        raise error_from_output(first)
    if isinstance(first, TokenOutput) and on_first_token is not None:
        on_first_token()
    return EngineStream(outputs, first)


async def collect(
    engine: Any, request: GenerationRequest, on_first_token: Callable[[], None] | None = None
) -> Completion:
    """Run one request to its end and return all its tokens and its final output."""
    stream = await open_stream(engine, request, on_first_token)
    tokens: list[TokenOutput] = []
    final: FinalOutput | None = None
    try:
        # Read to the end (not just to the final output) so the engine sees a finished, not aborted, request.
        async for out in stream:
            if isinstance(out, TokenOutput):
                tokens.append(out)
            elif isinstance(out, FinalOutput):
                final = out
            else:
                raise error_from_output(out)
    finally:
        await stream.aclose()
    if final is None:
        raise IncompleteGenerationError("the engine ended the request without a final output")
    return Completion(final, tokens)


async def generate_best_of(
    engine: Any, v: ValidatedRequest, on_first_token: Callable[[], None] | None = None
) -> tuple[Completion, list[Completion]]:
    """Run `v.best_of` sampled copies of the request concurrently (distinct seeds); return the one with the
    highest sum of token log-probabilities, and the others."""
    if v.best_of == 1:
        return await collect(engine, v.request, on_first_token), []
    hook = _once(on_first_token)
    copies = [
        replace(
            v.request,
            sampling=replace(v.request.sampling, seed=seed),
            request_id=f"{v.request.request_id}-{i}",
        )
        for i, seed in enumerate(_distinct_seeds(v.best_of))
    ]
    tasks = [asyncio.ensure_future(collect(engine, r, hook)) for r in copies]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        # One failed (or we were cancelled): stop the others too, and let them close their engine requests.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    best = max(range(len(results)), key=lambda i: results[i].logprob_sum)
    return results[best], [r for i, r in enumerate(results) if i != best]


async def cancel_on_disconnect(http_request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising `ClientDisconnected`) if the HTTP client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(http_request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # the engine has seen the abort when this returns
    raise ClientDisconnected()


async def _wait_for_disconnect(http_request: Request) -> None:
    # The body has been read already, so the next ASGI message is the disconnect (or the server's own
    # end-of-response notice, after which this watcher has been cancelled anyway).
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return


def _distinct_seeds(n: int) -> list[int]:
    seeds: set[int] = set()
    while len(seeds) < n:
        seeds.add(secrets.randbits(63))
    return list(seeds)


def _once(hook: Callable[[], None] | None) -> Callable[[], None] | None:
    if hook is None:
        return None
    called = False

    def wrapper() -> None:
        nonlocal called
        if not called:
            called = True
            hook()

    return wrapper
