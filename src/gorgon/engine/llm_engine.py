"""The synchronous engine: schedule a step, run the model, sample, and turn tokens into outputs.

`step()` is the whole data path of one iteration: scheduler -> runner -> sampler -> detokenised outputs.
It is driven by `AsyncEngine`'s background thread, or directly by tests and offline generation.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gorgon.config import EngineConfig, ModelConfig
from gorgon.engine.detokenizer import IncrementalDetokenizer
from gorgon.engine.kv_cache import KVCache, SlotAllocator, kv_cache_dtype
from gorgon.engine.request import (
    Alternative,
    ErrorOutput,
    FinalOutput,
    GenerationRequest,
    PrefillToken,
    TokenOutput,
)
from gorgon.engine.runner import ModelRunner
from gorgon.engine.sampler import RowSampling, sample
from gorgon.engine.scheduler import ScheduledChunk, Scheduler
from gorgon.engine.sequence import Sequence
from gorgon.models.llama import LlamaModel

log = logging.getLogger(__name__)

Output = TokenOutput | FinalOutput | ErrorOutput
Sink = Callable[[Output], None]


@dataclass
class _Live:
    seq: Sequence
    sink: Sink
    detok: IncrementalDetokenizer


class LLMEngine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer,
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
        eos_token_ids: set[int],
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.dtype, self.device = dtype, device
        self.eos_token_ids = eos_token_ids
        self.special_ids = set(getattr(tokenizer, "all_special_ids", [])) | eos_token_ids
        cfg: ModelConfig = model.config
        self.cache = KVCache(cfg, config.max_batch_total_tokens, kv_cache_dtype(dtype, device), device)
        self.scheduler = Scheduler(config, SlotAllocator(config.max_batch_total_tokens))
        self.runner = ModelRunner(model, self.cache, dtype, device, config.batch_invariant)
        self._live: dict[int, _Live] = {}
        self.generated_tokens = 0
        self.last_batch_size = 0

    # --- requests in and out -------------------------------------------------------------------------
    def add_request(self, request: GenerationRequest, sink: Sink, seq_id: int | None = None) -> int:
        seed = request.sampling.seed
        if seed is None:
            seed = secrets.randbits(63)
        seq = Sequence(request=request, seed=seed)
        if seq_id is not None:
            seq.seq_id = seq_id
        detok = IncrementalDetokenizer(self.tokenizer, list(request.prompt_ids))
        self._live[seq.seq_id] = _Live(seq, sink, detok)
        self.scheduler.add(seq)
        return seq.seq_id

    def abort(self, seq_id: int) -> None:
        live = self._live.pop(seq_id, None)
        if live is not None:
            self.scheduler.finish(live.seq)

    def fail_all(self, message: str) -> None:
        for live in list(self._live.values()):
            self._fail(live.seq, message)

    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    # --- one iteration ---------------------------------------------------------------------------------
    def step(self) -> None:
        plan = self.scheduler.schedule()
        if plan is None:
            return
        self.last_batch_size = len(plan.chunks)
        try:
            logits = self.runner.run(plan)
        except Exception as exc:  # a failed forward pass fails the step's requests, not the server
            log.exception("model step failed")
            for chunk in plan.chunks:
                self._fail(chunk.seq, f"model step failed: {exc}")
            return
        for chunk, chunk_logits in zip(plan.chunks, logits):
            chunk.seq.num_cached = chunk.end
            if chunk.want_all_logits:
                self._record_prefill_logprobs(chunk, chunk_logits)
        sampling = [(c, lg[-1:]) for c, lg in zip(plan.chunks, logits) if c.samples]
        if sampling:
            self._sample_and_emit(sampling)

    def _sample_and_emit(self, sampling: list[tuple[ScheduledChunk, torch.Tensor]]) -> None:
        rows = []
        for chunk, _ in sampling:
            seq = chunk.seq
            history = torch.tensor(seq.token_ids, dtype=torch.long, device=self.device)
            rows.append(
                RowSampling(
                    params=seq.request.sampling,
                    seed=seq.seed,
                    step=seq.num_generated,
                    history=history,
                    top_n=seq.request.top_n_tokens,
                )
            )
        result = sample(torch.cat([lg for _, lg in sampling]), rows)
        tokens = result.token_ids.tolist()
        logprobs = result.logprobs.tolist()
        for i, (chunk, _) in enumerate(sampling):
            alts = tuple(
                Alternative(tid, self.tokenizer.decode([tid]), lp) for tid, lp in result.alternatives[i]
            )
            self._append_token(chunk.seq, tokens[i], logprobs[i], alts, skipped=False)

    def _append_token(self, seq: Sequence, token: int, logprob: float, alts, skipped: bool) -> None:
        live = self._live.get(seq.seq_id)
        if live is None:
            return
        seq.token_ids.append(token)
        self.generated_tokens += 1
        text = live.detok.step(token)
        reason = self._finish_reason(seq, token, live.detok.text)
        out = TokenOutput(
            token, text, logprob, token in self.special_ids, skipped, alts, finish_reason=reason
        )
        seq.outputs.append(out)
        live.sink(out)
        if reason is not None:
            self._finish(seq, reason)

    def _finish_reason(self, seq: Sequence, token: int, text: str) -> str | None:
        stopping = seq.request.stopping
        if token in self.eos_token_ids and not stopping.ignore_eos_token:
            return "eos_token"
        if any(stop and stop in text[-(len(stop) + 64) :] for stop in stopping.stop_sequences):
            return "stop_sequence"
        if seq.num_generated >= stopping.max_new_tokens:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        live = self._live.pop(seq.seq_id)
        self.scheduler.finish(seq)
        text = self.tokenizer.decode(seq.generated_ids, skip_special_tokens=True)
        if reason == "stop_sequence":
            text = _cut_after_stop(text, seq.request.stopping.stop_sequences)
        live.sink(
            FinalOutput(
                generated_text=text,
                finish_reason=reason,
                prompt_tokens=seq.num_prompt,
                generated_tokens=seq.num_generated,
                skipped_tokens=seq.skipped_tokens,
                seed=seq.seed if not seq.request.sampling.greedy else None,
                prefill=tuple(seq.prefill),
                tokens=tuple(seq.outputs),
            )
        )

    def _fail(self, seq: Sequence, message: str) -> None:
        live = self._live.pop(seq.seq_id, None)
        self.scheduler.finish(seq)
        if live is not None:
            live.sink(ErrorOutput(message))

    def _record_prefill_logprobs(self, chunk: ScheduledChunk, logits: torch.Tensor) -> None:
        seq = chunk.seq
        prompt = seq.request.prompt_ids
        if chunk.start == 0:
            seq.prefill.append(PrefillToken(prompt[0], self.tokenizer.decode([prompt[0]]), None))
        # Row i predicts the token at position start + i + 1 (only prompt tokens are reported here).
        targets = prompt[chunk.start + 1 : chunk.end + 1]
        logprobs = torch.log_softmax(logits[: len(targets)], dim=-1)
        picked = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
        for tid, lp in zip(targets, picked):
            seq.prefill.append(PrefillToken(tid, self.tokenizer.decode([tid]), lp))


def _cut_after_stop(text: str, stops: tuple[str, ...]) -> str:
    """Keep the text up to and including the first stop sequence (LoRAX keeps the stop in the output)."""
    ends = [text.find(s) + len(s) for s in stops if s and s in text]
    return text[: min(ends)] if ends else text
