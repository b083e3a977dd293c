"""Robustness fixtures: the real engine (tiny random Llama, CPU) with small limits, served by uvicorn once
for the whole session, so hostile requests meet the real tokenizer, validation and engine."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest
from helpers import SMALL_CONFIG, running_engine, save_tiny_checkpoint, serve

from gorgon.server.app import create_app

# The server tests' small limits, with best_of capped at 2 (hostile cases probe that bound).
ROBUST_CONFIG = dataclasses.replace(SMALL_CONFIG, max_best_of=2)


@pytest.fixture(scope="session")
def robust_engine(tmp_path_factory):
    """The real `AsyncEngine` with `ROBUST_CONFIG`; adapters named by requests never reach the network."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        path = tmp_path_factory.mktemp("robust_llama")
        save_tiny_checkpoint(path, ROBUST_CONFIG.max_total_tokens)
        with running_engine(path, ROBUST_CONFIG) as engine:
            yield engine


@pytest.fixture(scope="session")
def robust_url(robust_engine) -> Iterator[str]:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with serve(create_app(robust_engine)) as url:
        yield url
