"""Where distillation gets its answers: an OpenAI-compatible server over HTTP, or an in-process `AsyncEngine`.

Both expose the same two calls: `chat` (messages in, the assistant's answer out) and `complete` (raw text
continuation, which Magpie synthesis needs to start the model inside a user turn). Failures are sorted into
`TransientError` (worth retrying: network, 5xx, 429, engine step failures) and `PermanentError` (the same
request would fail again: 4xx, a prompt longer than the model's limits). `call_with_retries` retries the first
with exponential backoff.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gorgon.training.conversations import Message

log = logging.getLogger(__name__)

T = TypeVar("T")

# Statuses that say "try again later" rather than "this request is wrong".
_RETRYABLE_STATUS = {408, 409, 425, 429}


class BackendError(Exception):
    """A request that did not produce an answer."""


class TransientError(BackendError):
    pass


class PermanentError(BackendError):
    pass


@dataclass(frozen=True)
class Completion:
    text: str
    # "stop" (the model ended its turn or hit a stop sequence) | "length" (max tokens) | "loop" (stopped
    # where a degenerate loop began; the text ends before it)
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def truncated(self) -> bool:
        return self.finish_reason in ("length", "loop")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # total tries, the first included
    base_delay: float = 1.0  # seconds before the first retry; doubles each time
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("--retries must be at least 0 (attempts >= 1)")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("--retry-backoff must be non-negative")

    def delay(self, retry: int) -> float:
        # Full jitter: concurrent workers that failed together do not retry together.
        return random.uniform(0.5, 1.0) * min(self.max_delay, self.base_delay * 2**retry)


async def call_with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """`await call()`, retrying `TransientError` up to `policy.attempts` tries; the last error propagates."""
    for attempt in range(policy.attempts):
        try:
            return await call()
        except TransientError as e:
            if attempt + 1 >= policy.attempts:
                raise
            delay = policy.delay(attempt)
            log.debug("%s failed (%s); retry %d in %.2fs", what, e, attempt + 1, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


class ChatBackend(abc.ABC):
    """The model, however it is reached."""

    # Whether `complete` tokenizes its prompt with the tokenizer's special tokens (a server does: BOS added).
    adds_special_tokens: bool = False

    @abc.abstractmethod
    async def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        stop_loops: bool = False,
    ) -> Completion:
        """The assistant's answer; with `stop_loops`, streamed and stopped where a loop begins."""

    @abc.abstractmethod
    async def complete(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
    ) -> Completion:
        """Continue `prompt` (special tokens as text). The stop sequence is not returned."""

    async def aclose(self) -> None:
        pass


# --- HTTP ----------------------------------------------------------------------------------------------------
class HttpChatBackend(ChatBackend):
    """`/v1/chat/completions` and `/v1/completions` of any OpenAI-compatible server (Gorgon, vLLM, TGI...)."""

    adds_special_tokens = True

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_connections: int = 64,
    ) -> None:
        import httpx

        base = url.rstrip("/")
        base = base.removesuffix("/v1")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"--url must start with http:// or https://, got {url!r}")
        self.base_url = base
        self.model = model
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not one INFO line per request
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=base,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=30.0),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def _post(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The answer's JSON and its first choice."""
        import httpx

        if self.model is not None:
            body = {"model": self.model, **body}
        try:
            r = await self._client.post(path, json=body)
        except httpx.TransportError as e:  # connect refused, reset, timeout: the server may come back
            raise TransientError(f"{type(e).__name__}: {e}") from e
        if r.status_code != 200:
            detail = r.text[:300]
            raise _status_error(r.status_code, path, detail)
        try:
            data = r.json()
            choice = data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise TransientError(f"malformed answer from {path}: {r.text[:300]}") from e
        if not isinstance(choice, dict):
            raise TransientError(f"malformed answer from {path}: {r.text[:300]}")
        return data, choice

    @staticmethod
    def _completion(data: dict[str, Any], choice: dict[str, Any], text: Any) -> Completion:
        usage = data.get("usage") or {}
        finish = choice.get("finish_reason") or "stop"
        return Completion(
            text=text if isinstance(text, str) else "",
            finish_reason="length" if finish == "length" else "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )

    async def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        stop_loops: bool = False,
    ) -> Completion:
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        if stop_loops:
            return await self._stream_chat(body)
        data, choice = await self._post("/v1/chat/completions", body)
        message = choice.get("message") or {}
        return self._completion(data, choice, message.get("content"))

    async def _stream_chat(self, body: dict[str, Any]) -> Completion:
        """A streamed chat answer, abandoned where a loop begins (closing the stream cancels the request on
        servers that notice disconnects, Gorgon among them)."""
        import httpx

        from gorgon.training.prepare import LoopWatch

        if self.model is not None:
            body = {"model": self.model, **body}
        watch, finish = LoopWatch(), "stop"
        try:
            async with self._client.stream(
                "POST", "/v1/chat/completions", json={**body, "stream": True}
            ) as r:
                if r.status_code != 200:
                    detail = (await r.aread()).decode(errors="replace")[:300]
                    raise _status_error(r.status_code, "/v1/chat/completions", detail)
                async for line in r.aiter_lines():
                    choice = _stream_choice(line)
                    if choice is None:
                        continue
                    piece = (choice.get("delta") or {}).get("content") or ""
                    finish = choice.get("finish_reason") or finish
                    if piece and (cut := watch.feed(piece)) is not None:
                        return Completion(watch.text[:cut].rstrip(), "loop", completion_tokens=watch.pieces)
        except httpx.TransportError as e:
            raise TransientError(f"{type(e).__name__}: {e}") from e
        finish = "length" if finish == "length" else "stop"
        return Completion(watch.text, finish, completion_tokens=watch.pieces)

    async def complete(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
    ) -> Completion:
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            body["stop"] = list(stop)
        if seed is not None:
            body["seed"] = seed
        data, choice = await self._post("/v1/completions", body)
        return self._completion(data, choice, choice.get("text"))

    async def aclose(self) -> None:
        await self._client.aclose()


def _status_error(status: int, path: str, detail: str) -> BackendError:
    """A non-200 answer as an error: transient (5xx, 408, 409, 425, 429) or permanent (other 4xx)."""
    cls = TransientError if status >= 500 or status in _RETRYABLE_STATUS else PermanentError
    return cls(f"HTTP {status} from {path}: {detail}")


def _stream_choice(line: str) -> dict[str, Any] | None:
    """The first choice of one server-sent event line of a streamed chat answer, or None (other lines)."""
    import json

    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if payload == "[DONE]":
        return None
    try:
        choice = json.loads(payload)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise TransientError(f"malformed stream event: {line[:300]}") from e
    return choice if isinstance(choice, dict) else None


# --- in-process ----------------------------------------------------------------------------------------------
class EngineChatBackend(ChatBackend):
    """A started `AsyncEngine` in this process: the chat template is applied here, no HTTP, no server.

    Requests are sent concurrently; the engine's continuous batching runs them together.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer

    def _ids(self, text: str) -> list[int]:
        # The rendered text carries the template's special tokens (BOS included) already.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int,
        temperature: float,
        seed: int | None = None,
        stop_loops: bool = False,
    ) -> Completion:
        if not getattr(self.tokenizer, "chat_template", None):
            raise PermanentError("this model's tokenizer has no chat template")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return await self._generate(self._ids(prompt), max_tokens, temperature, (), seed, stop_loops)

    async def complete(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
    ) -> Completion:
        return await self._generate(self._ids(prompt), max_tokens, temperature, stop, seed)

    async def _generate(
        self,
        ids: list[int],
        max_tokens: int,
        temperature: float,
        stop: tuple[str, ...],
        seed: int | None,
        stop_loops: bool = False,
    ) -> Completion:
        from gorgon.engine.request import (
            ErrorOutput,
            FinalOutput,
            GenerationRequest,
            SamplingParams,
            StoppingParams,
            TokenOutput,
        )
        from gorgon.errors import GorgonError
        from gorgon.training.prepare import LoopWatch

        cfg = self.engine.config
        if not ids:
            raise PermanentError("empty prompt")
        if len(ids) > cfg.max_input_length:
            raise PermanentError(
                f"prompt has {len(ids)} tokens, more than --max-input-length {cfg.max_input_length}"
            )
        # As much of the budget as the engine's total-token limit leaves; a cut answer reports "length".
        max_new = min(max_tokens, cfg.max_total_tokens - len(ids))
        request = GenerationRequest(
            prompt_ids=ids,
            sampling=SamplingParams(do_sample=temperature > 0, temperature=temperature or 1.0, seed=seed),
            stopping=StoppingParams(max_new_tokens=max_new, stop_sequences=stop),
        )
        watch = LoopWatch() if stop_loops else None
        stream = self.engine.generate(request)
        try:
            async for out in stream:
                if watch is not None and isinstance(out, TokenOutput):
                    cut = watch.feed(out.text)
                    if cut is not None:  # closing the stream below aborts the request
                        return Completion(watch.text[:cut].rstrip(), "loop", len(ids), watch.pieces)
                if isinstance(out, FinalOutput):
                    text = out.generated_text
                    if out.finish_reason == "stop_sequence":
                        text = _cut_at_stop(text, stop)
                    return Completion(
                        text=text,
                        finish_reason="length" if out.finish_reason == "length" else "stop",
                        prompt_tokens=out.prompt_tokens,
                        completion_tokens=out.generated_tokens,
                    )
                if isinstance(out, ErrorOutput):
                    raise TransientError(out.message)
        except GorgonError as e:  # overloaded, or the engine has failed
            raise TransientError(str(e)) from e
        finally:
            await stream.aclose()
        raise TransientError("the engine closed the stream without a final output")


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text
