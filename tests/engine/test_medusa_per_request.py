"""Medusa adapters end to end through AsyncEngine: the default adapter, adapters named by requests (loaded
once, off the loop, checked by LoRAX's rules), mixed in one batch, with outputs equal to plain decoding."""

from __future__ import annotations

import asyncio

import pytest
from helpers import final_tokens, make_medusa_adapter, save_tiny_checkpoint

from gorgon.config import EngineConfig, SpeculationConfig
from gorgon.engine.engine import AsyncEngine
from gorgon.engine.request import GenerationRequest, SamplingParams, StoppingParams
from gorgon.errors import GenerationError

CONFIG = EngineConfig(
    max_input_length=64, max_total_tokens=160, max_batch_total_tokens=4000, measure_speculation_cost=False
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_medusa")
    _, hf = save_tiny_checkpoint(path)
    return path, hf


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "default": make_medusa_adapter(root, "default", seed=1),
        "other": make_medusa_adapter(root, "other", seed=2),
        "third": make_medusa_adapter(root, "third", seed=3),
        "v1": make_medusa_adapter(root, "v1", version=1, seed=4),
        "two_heads": make_medusa_adapter(root, "two_heads", heads=2, seed=5),
    }


def engine(checkpoint, speculation=None) -> AsyncEngine:
    eng = AsyncEngine.from_pretrained(
        str(checkpoint[0]), dtype="float32", device="cpu", engine_config=CONFIG, speculation=speculation
    )
    eng.start()
    return eng


def request(prompt, adapter_id=None, source="local"):
    return GenerationRequest(
        list(prompt),
        SamplingParams(),
        StoppingParams(max_new_tokens=24, ignore_eos_token=True),
        adapter_id=adapter_id,
        adapter_source=source,
    )


PROMPTS = [[5, 9, 11, 40, 3], [7, 7, 8, 100, 101, 102], [60, 61, 62]]


def test_default_and_per_request_adapters_in_one_batch(checkpoint, adapters):
    plain = engine(checkpoint)
    spec = engine(checkpoint, SpeculationConfig(adapter_id=adapters["default"], adapter_source="local"))
    try:
        expected = [asyncio.run(final_tokens(plain, request(p))) for p in PROMPTS]
        assert spec.speculate == 3

        async def mixed():
            ids = [None, adapters["other"], adapters["third"], adapters["other"], adapters["default"]]
            reqs = [request(PROMPTS[i % 3], a) for i, a in enumerate(ids)]
            return await asyncio.gather(*(final_tokens(spec, r) for r in reqs))

        results = asyncio.run(mixed())
        for i, tokens in enumerate(results):
            assert tokens == expected[i % 3]
        assert spec.adapters.loads == 2  # "other" once for two concurrent requests; the default never
        assert spec.speculation_stats().verified_sequences > 0
    finally:
        plain.shutdown()
        spec.shutdown()


@pytest.mark.parametrize(
    "name, message",
    [
        ("v1", "cannot be loaded per request"),
        ("two_heads", "2 heads"),
        ("missing", "no such directory"),
    ],
)
def test_per_request_rules(checkpoint, adapters, tmp_path, name, message):
    spec = engine(checkpoint, SpeculationConfig(adapter_id=adapters["default"], adapter_source="local"))
    try:
        adapter = adapters.get(name, str(tmp_path / "nowhere"))
        with pytest.raises(GenerationError, match=message):
            asyncio.run(final_tokens(spec, request(PROMPTS[0], adapter)))
        # The server goes on serving.
        assert len(asyncio.run(final_tokens(spec, request(PROMPTS[1])))) == 24
    finally:
        spec.shutdown()


def test_per_request_needs_a_default_medusa_adapter(checkpoint, adapters):
    eng = engine(checkpoint)
    try:
        with pytest.raises(GenerationError, match="default Medusa adapter"):
            asyncio.run(final_tokens(eng, request(PROMPTS[0], adapters["other"])))
    finally:
        eng.shutdown()


def test_lora_directory_without_weights_fails_clearly(checkpoint, adapters, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"r": 8, "target_modules": ["q_proj"]}')
    spec = engine(checkpoint, SpeculationConfig(adapter_id=adapters["default"], adapter_source="local"))
    try:
        with pytest.raises(GenerationError, match="LoRA adapter .* has no weights"):
            asyncio.run(final_tokens(spec, request(PROMPTS[0], str(tmp_path))))
    finally:
        spec.shutdown()
