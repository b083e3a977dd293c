"""Robustness fixtures: the real engine (tiny random Llama, CPU) with small limits, served by uvicorn once
for the whole session, so hostile requests meet the real tokenizer, validation and engine."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers import save_tiny_checkpoint, serve

from gorgon.config import EngineConfig
from gorgon.server.app import create_app

ROBUST_CONFIG = EngineConfig(
    max_input_length=64,
    max_total_tokens=128,
    max_batch_total_tokens=1024,
    max_concurrent_requests=8,
    max_stop_sequences=3,
    max_best_of=2,
)


@pytest.fixture(scope="session")
def robust_engine(tmp_path_factory):
    """The real `AsyncEngine` with `ROBUST_CONFIG`; adapters named by requests never reach the network."""
    from gorgon.engine.engine import AsyncEngine

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        path = tmp_path_factory.mktemp("robust_llama")
        save_tiny_checkpoint(path, ROBUST_CONFIG.max_total_tokens)
        engine = AsyncEngine.from_pretrained(
            str(path), dtype="float32", device="cpu", engine_config=ROBUST_CONFIG
        )
        engine.start()
        try:
            yield engine
        finally:
            engine.shutdown()


@pytest.fixture(scope="session")
def robust_url(robust_engine) -> Iterator[str]:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with serve(create_app(robust_engine)) as url:
        yield url
