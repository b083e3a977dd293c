"""Fixtures for the distillation tests: a fake OpenAI-compatible server with scripted failures, live on a free
port, and a tiny real engine (random Llama, tiny tokenizer) for the in-process backend."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from fake_openai import BROKEN, FLAKY, LONG, LOOP, REFUSED, fake_answer, loop_words
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from helpers import running_engine, save_tiny_checkpoint, serve

from gorgon.config import EngineConfig


# Magic words in a user message that make the fake server misbehave.
@dataclass
class FakeOpenAI:
    flaky_failures: int = 2
    completions: list[str] = field(default_factory=list)  # scripted /v1/completions texts, in turn
    chat_calls: Counter = field(default_factory=Counter)  # by last user message
    requests: list[dict] = field(default_factory=list)
    completion_calls: int = 0
    completion_finish: dict[int, str] = field(default_factory=dict)  # call index -> finish_reason
    streamed_pieces: list[int] = field(default_factory=list)  # per streamed answer, the pieces sent

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            last = body["messages"][-1]["content"]
            self.chat_calls[last] += 1
            if BROKEN in last or (FLAKY in last and self.chat_calls[last] <= self.flaky_failures):
                return JSONResponse({"error": "boom", "error_type": "generation"}, status_code=500)
            if REFUSED in last:
                return JSONResponse({"error": "too long", "error_type": "validation"}, status_code=422)
            if body.get("stream"):
                words = loop_words(body["max_tokens"]) if LOOP in last else [fake_answer(body["messages"])]
                finish = "length" if LOOP in last or LONG in last else "stop"
                return StreamingResponse(self._stream(words, finish), media_type="text/event-stream")
            text = "".join(loop_words(body["max_tokens"])) if LOOP in last else fake_answer(body["messages"])
            return {
                "id": "x",
                "object": "chat.completion",
                "model": body.get("model") or "fake",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "length" if LONG in last or LOOP in last else "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }

        @app.post("/v1/completions")
        async def complete(request: Request):
            body = await request.json()
            self.requests.append(body)
            i = self.completion_calls
            self.completion_calls += 1
            text = self.completions[i % len(self.completions)] if self.completions else "hello"
            return {
                "id": "y",
                "object": "text_completion",
                "model": "fake",
                "choices": [
                    {"index": 0, "text": text, "finish_reason": self.completion_finish.get(i, "stop")}
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
            }

        return app

    async def _stream(self, pieces: list[str], finish: str):
        """OpenAI's chat stream: a role chunk, one chunk per piece, a finish chunk, [DONE]; counts what it
        sent (a client that hangs up stops it early)."""
        import asyncio
        import json

        def event(delta, finish_reason=None):
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"

        self.streamed_pieces.append(0)
        yield event({"role": "assistant"})
        for piece in pieces:
            await asyncio.sleep(0.002)  # a model's pace, roughly: a client that hangs up is noticed in time
            self.streamed_pieces[-1] += 1
            yield event({"content": piece})
        yield event({}, finish)
        yield "data: [DONE]\n\n"


@pytest.fixture
def fake_openai() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
def fake_url(fake_openai) -> Iterator[str]:
    with serve(fake_openai.app()) as url:
        yield url


TINY_CONFIG = EngineConfig(
    max_input_length=200,
    max_total_tokens=256,
    max_batch_total_tokens=2048,
    max_concurrent_requests=8,
    max_stop_sequences=4,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with the tiny tokenizer (and its chat template), saved to a directory."""
    path = tmp_path_factory.mktemp("tiny_llama_distill")
    save_tiny_checkpoint(path, TINY_CONFIG.max_total_tokens)
    return path


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    with running_engine(tiny_model_dir, TINY_CONFIG) as engine:
        yield engine
