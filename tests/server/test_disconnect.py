"""A client that goes away cancels its request: the engine's output generator is closed (the engine aborts
the request and frees its KV). Live uvicorn server, fake engine generating slowly."""

from __future__ import annotations

import httpx
import pytest
from fake_engine import FakeEngine
from helpers import SMALL_CONFIG, serve, wait_until

from gorgon.server.app import create_app

SLOW = 0.02  # seconds per token: 100 tokens take 2 s, far longer than the client waits


@pytest.fixture
def slow_engine(tiny_tokenizer) -> FakeEngine:
    return FakeEngine(tiny_tokenizer, SMALL_CONFIG, token_delay=SLOW)


@pytest.fixture
def slow_url(slow_engine):
    with serve(create_app(slow_engine)) as url:
        yield url


def aborted_all(engine: FakeEngine, n: int = 1) -> bool:
    return len(engine.requests) == n and len(engine.aborted) == n and engine.in_flight == 0


@pytest.mark.parametrize(
    "path, body",
    [
        ("/generate_stream", {"inputs": "Hi", "parameters": {"max_new_tokens": 100}}),
        ("/", {"inputs": "Hi", "parameters": {"max_new_tokens": 100}, "stream": True}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 100, "stream": True}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100, "stream": True},
        ),
    ],
)
def test_stream_disconnect_aborts(slow_url, slow_engine, path, body):
    with httpx.Client(timeout=10) as c, c.stream("POST", f"{slow_url}{path}", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data:")  # generation is under way
    # Leaving the blocks closed the connection mid-stream.
    assert wait_until(lambda: aborted_all(slow_engine), timeout=3)
    assert slow_engine.completed == []


@pytest.mark.parametrize(
    "path, body, n",
    [
        ("/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 100}}, 1),
        ("/", {"inputs": "Hi", "parameters": {"max_new_tokens": 100}}, 1),
        (
            "/generate",
            {"inputs": "Hi", "parameters": {"max_new_tokens": 100, "best_of": 3, "do_sample": True}},
            3,
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100}, 1),
    ],
)
def test_request_disconnect_aborts(slow_url, slow_engine, path, body, n):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_url}{path}", json=body, timeout=0.3)
    assert wait_until(lambda: aborted_all(slow_engine, n), timeout=3)
    assert slow_engine.completed == []


def test_finished_requests_are_not_aborted(slow_url, slow_engine):
    r = httpx.post(
        f"{slow_url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}, timeout=10
    )
    assert r.status_code == 200
    with httpx.stream(
        "POST", f"{slow_url}/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
    ) as s:
        assert len([line for line in s.iter_lines() if line]) == 3
    assert wait_until(lambda: slow_engine.in_flight == 0)
    assert slow_engine.aborted == [] and len(slow_engine.completed) == 2
