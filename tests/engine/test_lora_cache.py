"""The adapter cache and LoRA failures through AsyncEngine: LRU eviction by count and by memory, one load
for concurrent requests, loading off the generation loop while others stream, and each bad adapter failing
its own request (LoRAX error format over HTTP) while the server keeps serving."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch
from helpers import final_tokens, save_peft_adapter, save_tiny_checkpoint, serve, tiny_hf_model

from gorgon.config import AdapterConfig, EngineConfig
from gorgon.engine.engine import AsyncEngine
from gorgon.engine.request import GenerationRequest, SamplingParams, StoppingParams
from gorgon.errors import GenerationError

CONFIG = EngineConfig(
    max_input_length=64, max_total_tokens=256, max_batch_total_tokens=4000, measure_speculation_cost=False
)
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_cache")
    tok, hf = save_tiny_checkpoint(root / "model")
    for i in range(4):
        save_peft_adapter(hf, root / f"lora{i}", seed=i, **LORA)
    other = tiny_hf_model("llama", hidden_size=32, intermediate_size=64, vocab_size=len(tok))
    save_peft_adapter(other, root / "other_base", **LORA)  # same names, other shapes
    save_peft_adapter(hf, root / "corrupt", **LORA)
    weights = root / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return root


def _engine(root, **adapter_kwargs) -> AsyncEngine:
    eng = AsyncEngine.from_pretrained(
        str(root / "model"),
        dtype="float32",
        device="cpu",
        engine_config=CONFIG,
        adapters=AdapterConfig(**adapter_kwargs),
    )
    eng.start()
    return eng


def _request(adapter=None, max_new=12):
    return GenerationRequest(
        [5, 9, 11, 40, 3],
        SamplingParams(),
        StoppingParams(max_new_tokens=max_new, ignore_eos_token=True),
        adapter_id=adapter,
        adapter_source="local",
    )


def test_lru_eviction_by_count(setup):
    eng = _engine(setup, max_active_adapters=2)
    try:
        ids = [str(setup / f"lora{i}") for i in range(3)]
        first = [asyncio.run(final_tokens(eng, _request(a))) for a in ids]
        assert eng.adapters.loads == 3 and len(eng.adapters) == 2 and eng.adapters.evictions == 1
        assert not eng.adapters.cached(ids[0], "local")
        assert asyncio.run(final_tokens(eng, _request(ids[0]))) == first[0]  # reloaded, same tokens
        assert eng.adapters.loads == 4
        assert len({tuple(t) for t in first}) == 3  # the adapters really differ
    finally:
        eng.shutdown()


def test_memory_budget_evicts_and_refuses(setup):
    eng = _engine(setup)
    try:
        a0, a1 = str(setup / "lora0"), str(setup / "lora1")
        asyncio.run(final_tokens(eng, _request(a0)))
        size = eng.adapters.nbytes
        assert size > 0
        eng.adapters._max_bytes = int(size * 1.5)  # room for one adapter only
        asyncio.run(final_tokens(eng, _request(a1)))
        assert eng.adapters.cached(a1, "local") and not eng.adapters.cached(a0, "local")
        eng.adapters._max_bytes = size // 2
        # An adapter over the whole budget is refused before it is loaded (budget fixed by the loader).
    finally:
        eng.shutdown()
    small = _engine(setup, memory_fraction=1e-9)
    try:
        with pytest.raises(GenerationError, match="too large"):
            asyncio.run(final_tokens(small, _request(str(setup / "lora2"))))
    finally:
        small.shutdown()


def test_preloaded_adapters_stay(setup):
    keep = str(setup / "lora3")
    eng = _engine(
        setup, max_active_adapters=1, preloaded_adapter_ids=(keep,), preloaded_adapter_source="local"
    )
    try:
        assert eng.adapters.cached(keep, "local") and eng.adapters.loads == 1
        asyncio.run(final_tokens(eng, _request(str(setup / "lora0"))))
        asyncio.run(final_tokens(eng, _request(keep)))
        assert eng.adapters.cached(keep, "local") and eng.adapters.loads == 2  # never evicted, never reloaded
    finally:
        eng.shutdown()


def test_concurrent_requests_load_once_and_others_stream_meanwhile(setup):
    eng = _engine(setup)
    load = eng.adapters._load

    def slow_load(*args):
        time.sleep(1.0)
        return load(*args)

    eng.adapters._load = slow_load
    try:

        async def run():
            loading = asyncio.gather(*(final_tokens(eng, _request(str(setup / "lora1"))) for _ in range(4)))
            await asyncio.sleep(0.1)  # the adapter is loading now (for a second)
            base = await final_tokens(eng, _request(None, max_new=40))
            streamed_while_loading = not loading.done()
            return await loading, base, streamed_while_loading

        lora, base, streamed_while_loading = asyncio.run(run())
        assert eng.adapters.loads == 1
        assert all(t == lora[0] for t in lora)
        assert len(base) == 40 and streamed_while_loading  # a whole request ran while the adapter loaded
    finally:
        eng.shutdown()


def test_evicted_adapter_keeps_serving_its_running_request(setup):
    eng = _engine(setup, max_active_adapters=1)
    try:
        a0, a1 = str(setup / "lora0"), str(setup / "lora1")
        alone = asyncio.run(final_tokens(eng, _request(a0, max_new=60)))

        async def run():
            first = asyncio.create_task(final_tokens(eng, _request(a0, max_new=60)))
            await asyncio.sleep(0.05)
            await final_tokens(eng, _request(a1))  # evicts a0 while its request runs
            return await first

        assert asyncio.run(run()) == alone
    finally:
        eng.shutdown()


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing", "no such directory"),
        ("corrupt", "corrupt"),
        ("other_base", "another base model"),
    ],
)
def test_bad_adapter_fails_its_request_only(setup, name, message):
    eng = _engine(setup)
    try:

        async def run():
            good = [final_tokens(eng, _request(str(setup / "lora0"))), final_tokens(eng, _request(None))]
            bad = final_tokens(eng, _request(str(setup / name)))
            return await asyncio.gather(*good, bad, return_exceptions=True)

        ok0, ok1, err = asyncio.run(run())
        assert isinstance(err, GenerationError) and message in str(err), err
        assert len(ok0) == len(ok1) == 12
    finally:
        eng.shutdown()


def test_http_error_in_lorax_format(setup):
    from gorgon.server.app import create_app

    eng = _engine(setup)
    try:
        with serve(create_app(eng)) as url:
            body = {
                "inputs": "Hello",
                "parameters": {
                    "max_new_tokens": 4,
                    "adapter_id": str(setup / "other_base"),
                    "adapter_source": "local",
                },
            }
            r = httpx.post(f"{url}/generate", json=body, timeout=60)
            assert r.status_code == 424
            assert r.json()["error_type"] == "generation" and "another base model" in r.json()["error"]
            body["parameters"]["adapter_id"] = str(setup / "lora0")
            r = httpx.post(f"{url}/generate", json=body, timeout=60)
            assert r.status_code == 200 and r.json()["generated_text"] is not None
            text = httpx.get(f"{url}/metrics", timeout=10).text
            assert "gorgon_adapters_loaded 1.0" in text and "gorgon_adapter_loads_total 2.0" in text
    finally:
        eng.shutdown()


def test_lora_tensors_are_on_the_serving_dtype(setup):
    import json

    from gorgon.adapters.lora import load_lora_adapter
    from gorgon.config import ModelConfig

    cfg = ModelConfig.from_hf(json.loads((setup / "model" / "config.json").read_text()))
    adapter = load_lora_adapter(setup / "lora0", cfg, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert all(w.a.dtype == torch.bfloat16 for layer in adapter.layers for w in layer.values())
