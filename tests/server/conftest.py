"""Server test fixtures: a fake engine, an in-process client and a live uvicorn server (the tiny tokenizer
comes from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient
from helpers import SMALL_CONFIG, running_engine, save_tiny_checkpoint, serve

from gorgon.config import EngineConfig
from gorgon.server.app import create_app


@pytest.fixture
def fake_engine(tiny_tokenizer) -> FakeEngine:
    return FakeEngine(tiny_tokenizer, SMALL_CONFIG)


@pytest.fixture
def client(fake_engine) -> Iterator[TestClient]:
    with TestClient(create_app(fake_engine)) as c:
        yield c


@pytest.fixture
def live_url(fake_engine) -> Iterator[str]:
    with serve(create_app(fake_engine)) as url:
        yield url


# Room for long generations (the disconnect tests need requests that would run for many seconds).
REAL_CONFIG = EngineConfig(
    max_input_length=256,
    max_total_tokens=4096,
    max_batch_total_tokens=16384,
    max_concurrent_requests=8,
    max_stop_sequences=4,
    max_best_of=4,
)


@pytest.fixture(scope="session")
def real_engine(tmp_path_factory):
    """The real `AsyncEngine` on a tiny random Llama (float32, CPU) with the tiny tokenizer, started once."""
    path = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_checkpoint(path, REAL_CONFIG.max_total_tokens)
    with running_engine(path, REAL_CONFIG) as engine:
        yield engine


@pytest.fixture
def real_url(real_engine) -> Iterator[str]:
    with serve(create_app(real_engine)) as url:
        yield url
