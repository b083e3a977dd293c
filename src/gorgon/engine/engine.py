"""The async face of the engine: requests come in from the server's event loop, a background thread steps
the `LLMEngine`, and each request's outputs flow back through its own asyncio queue."""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from gorgon.adapters.registry import AdapterRegistry
from gorgon.config import AdapterConfig, EngineConfig, SpeculationConfig
from gorgon.engine.adapter_loader import RequestAdapter, device_memory_bytes, request_adapter_loader
from gorgon.engine.llm_engine import LLMEngine, Output
from gorgon.engine.request import ErrorOutput, FinalOutput, GenerationRequest
from gorgon.engine.speculation import Speculator, build_speculator
from gorgon.errors import GenerationError, IncompleteGenerationError, OverloadedError
from gorgon.models.factory import build_model, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    queue_length: int
    running: int
    batch_size: int
    generated_tokens: int


class AsyncEngine:
    def __init__(self, engine: LLMEngine, model_id: str) -> None:
        self.engine = engine
        self.model_id = model_id
        self.config: EngineConfig = engine.config
        self.tokenizer = engine.tokenizer
        self.dtype, self.device = engine.dtype, engine.device
        self.eos_token_ids = engine.eos_token_ids
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._in_flight = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._fatal: BaseException | None = None
        self.adapter_id: str | None = None  # the default adapter, if any
        self.adapters: AdapterRegistry | None = None  # adapters named by requests
        # A default LoRA (`--adapter-id` naming a LoRA): what requests naming no adapter are served with.
        self.default_adapter: RequestAdapter | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | None,
        *,
        dtype: str = "auto",
        device: str = "auto",
        engine_config: EngineConfig | None = None,
        revision: str | None = None,
        speculation: SpeculationConfig | None = None,
        adapters: AdapterConfig | None = None,
    ) -> AsyncEngine:
        from gorgon.models.loader import resolve_checkpoint

        ckpt = resolve_checkpoint(model_id, revision)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        t0 = time.perf_counter()
        model = build_model(ckpt, dt, dev)
        log.info("loaded %s (%s, %s) in %.1fs", ckpt.model_id, dt, dev, time.perf_counter() - t0)
        config = engine_config or EngineConfig()
        eos = set(ckpt.config.eos_token_ids)
        if ckpt.tokenizer.eos_token_id is not None:
            eos.add(ckpt.tokenizer.eos_token_id)
        speculation = speculation or SpeculationConfig()
        default_lora, speculation = _default_lora(speculation, model, ckpt.model_id, dt, dev)
        speculator = build_speculator(speculation, model, ckpt.model_id, dt, dev)
        llm = LLMEngine(model, ckpt.tokenizer, config, dt, dev, eos, speculator)
        engine = cls(llm, ckpt.model_id)
        engine.adapter_id = (default_lora.adapter_id if default_lora else speculation.adapter_id) or None
        engine.default_adapter = default_lora
        adapters = adapters or AdapterConfig()
        max_bytes = int(adapters.memory_fraction * device_memory_bytes(dev))
        default_heads = speculator.heads.config if isinstance(speculator, Speculator) else None
        load = request_adapter_loader(
            default_heads, model, ckpt.model_id, dt, dev, max_bytes, adapters.adapter_roots
        )
        engine.adapters = AdapterRegistry(load, adapters.max_active_adapters, max_bytes)
        for adapter_id in adapters.preloaded_adapter_ids:
            engine.adapters.preload(adapter_id, adapters.preloaded_adapter_source)
            log.info("preloaded adapter %s", adapter_id)
        return engine

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gorgon-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._fatal is None

    @property
    def speculate(self) -> int:
        """Speculative tokens per step (the tree's depth); 0 without speculation."""
        spec = self.engine.speculator
        return spec.num_speculative_tokens if spec else 0

    def speculation_stats(self):
        spec = self.engine.speculator
        return spec.stats if spec else None

    def stats(self) -> EngineStats:
        return EngineStats(
            queue_length=self.engine.num_waiting,
            running=self.engine.num_running,
            batch_size=self.engine.last_batch_size,
            generated_tokens=self.engine.generated_tokens,
        )

    # --- requests ------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Output]:
        if self._fatal is not None:
            raise IncompleteGenerationError(f"the engine has failed: {self._fatal}")
        if self._in_flight >= self.config.max_concurrent_requests:
            raise OverloadedError()
        self._in_flight += 1
        try:
            adapter = await self._request_adapter(request)
        except BaseException:
            self._in_flight -= 1
            raise
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[Output] = asyncio.Queue()
        seq_id = next(self._ids)
        finished = False
        try:
            sink = lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out)
            self._post(("add", seq_id, request, sink, adapter))
            while True:
                out = await outputs.get()
                yield out
                if isinstance(out, (FinalOutput, ErrorOutput)):
                    finished = True
                    return
        finally:
            self._in_flight -= 1
            if not finished:  # the consumer went away (client disconnect): free the slot and its KV
                self._post(("abort", seq_id))

    async def _request_adapter(self, request: GenerationRequest) -> RequestAdapter | None:
        """The request's own adapter (LoRA and/or Medusa heads), loaded once, off the generation loop, and
        checked; None for the server's default. Raises GenerationError (424) when it cannot be used."""
        if not request.adapter_id or request.adapter_id == self.adapter_id:
            return self.default_adapter
        if self.adapters is None:
            raise GenerationError(
                f"adapter {request.adapter_id!r}: this server loads no adapters per request"
            )
        return await self.adapters.get(request.adapter_id, request.adapter_source, request.api_token)

    def _post(self, item: tuple) -> None:
        self._inbox.put(item)
        self._wake.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, seq_id, request, sink, adapter = item
                medusa = adapter.medusa if adapter else None
                lora = adapter.lora if adapter else None
                self.engine.add_request(request, sink, seq_id=seq_id, medusa=medusa, lora=lora)
            else:
                self.engine.abort(item[1])

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stopping:
                self._drain_inbox()
                if not self.engine.has_work():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                self.engine.step()
        except BaseException as exc:
            self._fatal = exc
            log.exception("engine loop died")
            self.engine.fail_all(f"engine failure: {exc}")


def _default_lora(spec: SpeculationConfig, model, model_id: str, dtype, device):
    """(the default LoRA adapter or None, the speculation config left to build). `--adapter-id` may name a
    LoRA, as in LoRAX: it then serves every request that names no adapter, and speculation comes from its
    own Medusa heads when the directory has them, else from n-gram lookup if asked, else none."""
    from dataclasses import replace

    from gorgon.adapters.lora import is_lora_dir, load_lora_adapter
    from gorgon.adapters.medusa_io import is_medusa_dir
    from gorgon.adapters.source import resolve_adapter_dir

    if not spec.adapter_id:
        return None, spec
    path = resolve_adapter_dir(spec.adapter_id, spec.adapter_source, api_token=spec.api_token)
    if not is_lora_dir(path):
        return None, spec
    lora = load_lora_adapter(
        path, model.config, dtype=dtype, device=device, adapter_id=spec.adapter_id, model_id=model_id
    )
    log.info(
        "default adapter %s: LoRA%s", spec.adapter_id, " with its own Medusa heads" * is_medusa_dir(path)
    )
    adapter = RequestAdapter(spec.adapter_id, lora=lora, nbytes=lora.nbytes)
    return adapter, spec if is_medusa_dir(path) else replace(spec, adapter_id=None)
