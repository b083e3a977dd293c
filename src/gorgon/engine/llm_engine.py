"""The synchronous engine: schedule a step, run the model, sample, and turn tokens into outputs.

`step()` is the whole data path of one iteration: scheduler -> runner -> sampler -> detokenised outputs.
It is driven by `AsyncEngine`'s background thread, or directly by tests and offline generation.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
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
from gorgon.engine.sampler import RowSampling, processed_probs, sample
from gorgon.engine.scheduler import ScheduledChunk, Scheduler, StepPlan
from gorgon.engine.sequence import Sequence
from gorgon.engine.speculation import Speculator, StepCost
from gorgon.models.llama import LlamaModel
from gorgon.speculative.typical import typical_ok
from gorgon.speculative.verify import accept, emitted_tokens

log = logging.getLogger(__name__)

Output = TokenOutput | FinalOutput | ErrorOutput
Sink = Callable[[Output], None]


@dataclass
class _Live:
    seq: Sequence
    sink: Sink
    detok: IncrementalDetokenizer
    deadline: float | None = None  # time.monotonic() past which the request is failed


class LLMEngine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer,
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
        eos_token_ids: set[int],
        speculator: Speculator | None = None,
    ) -> None:
        self.model = model
        self.speculator = speculator
        self.tokenizer = tokenizer
        self.config = config
        self.dtype, self.device = dtype, device
        self.eos_token_ids = eos_token_ids
        self.special_ids = set(getattr(tokenizer, "all_special_ids", [])) | eos_token_ids
        cfg: ModelConfig = model.config
        self.cache = KVCache(cfg, config.max_batch_total_tokens, kv_cache_dtype(dtype, device), device)
        tree = speculator.tree if speculator else None
        tree_size = tree.size if tree else 0
        self.scheduler = Scheduler(config, SlotAllocator(config.max_batch_total_tokens), tree_size)
        self.runner = ModelRunner(model, self.cache, dtype, device, config.batch_invariant, tree)
        if speculator is not None and config.measure_speculation_cost:
            max_rows = min(speculator.max_batch_size, 32) * (1 + tree_size)
            speculator.cost = StepCost.measure(self.runner, max_rows)
        self._live: dict[int, _Live] = {}
        self.generated_tokens = 0
        self.last_batch_size = 0

    # --- requests in and out -------------------------------------------------------------------------
    def add_request(
        self,
        request: GenerationRequest,
        sink: Sink,
        seq_id: int | None = None,
        medusa=None,
        lora=None,
    ) -> int:
        """`medusa`, `lora`: the request's own Medusa heads and LoRA adapter (already loaded and checked)."""
        seed = request.sampling.seed
        if seed is None:
            seed = secrets.randbits(63)
        seq = Sequence(request=request, seed=seed, medusa=medusa, lora=lora)
        if seq_id is not None:
            seq.seq_id = seq_id
        detok = IncrementalDetokenizer(self.tokenizer, list(request.prompt_ids))
        timeout = self.config.request_timeout
        deadline = time.monotonic() + timeout if timeout else None
        self._live[seq.seq_id] = _Live(seq, sink, detok, deadline)
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

    def cache_free_slots(self) -> int:
        """KV slots not reserved by any request (all of them once every request has ended)."""
        return self.scheduler.allocator.num_free

    def cache_total_slots(self) -> int:
        return self.config.max_batch_total_tokens

    # --- one iteration ---------------------------------------------------------------------------------
    def step(self) -> None:
        self._expire()
        decoding = sum(1 for s in self.scheduler.running if not s.in_prefill)
        speculate = self.speculator is not None and self.speculator.should_speculate(decoding)
        if self.speculator is not None and decoding:
            stats = self.speculator.stats
            stats.steps_on, stats.steps_off = stats.steps_on + speculate, stats.steps_off + (not speculate)
        plan = self.scheduler.schedule(speculate=speculate)
        if plan is None:
            return
        if speculate and self.speculator.heads is not None:
            for chunk in plan.chunks:
                heads = chunk.seq.medusa or self.speculator.heads
                if chunk.samples and not heads.has_own_lm_heads:
                    chunk.draft_heads = heads
        self.last_batch_size = len(plan.chunks)
        started = time.perf_counter()
        try:
            out = self.runner.run(plan)
        except Exception as exc:  # a failed forward pass fails requests, never the server
            log.exception("model step failed")
            self._isolate_failure(plan, exc)
            return
        for chunk, chunk_logits in zip(plan.chunks, out.logits):
            chunk.seq.num_cached = chunk.end
            if chunk.want_all_logits:
                self._record_prefill_logprobs(chunk, chunk_logits)
        drafts = out.draft_logits or [None] * len(plan.chunks)
        sampling = [
            (c, lg, h, d) for c, lg, h, d in zip(plan.chunks, out.logits, out.hidden, drafts) if c.samples
        ]
        if sampling:
            self._sample_and_emit(sampling, speculate)
        if decoding:
            self._record_step_time(plan, decoding, speculate, time.perf_counter() - started)

    def _record_step_time(self, plan: StepPlan, decoding: int, speculate: bool, seconds: float) -> None:
        """Time pure decode steps for the speculation policy; a step with drafts counts only when every
        sequence verified one (the first step after a plain one has none yet and costs like a plain one)."""
        if self.speculator is None or not self.config.measure_speculation_cost:
            return
        if len(plan.chunks) != decoding:
            return  # a prefill chunk rode along: not a decode step's cost
        if speculate and not all(chunk.draft for chunk in plan.chunks):
            return
        self.speculator.times.record(decoding, speculate, seconds)

    def _expire(self) -> None:
        """Fail the requests whose deadline (`request_timeout`) has passed, waiting or running."""
        if not self.config.request_timeout:
            return
        now = time.monotonic()
        for live in [lv for lv in self._live.values() if lv.deadline is not None and now > lv.deadline]:
            self._fail(live.seq, f"request deadline of {self.config.request_timeout:g}s exceeded")

    def _isolate_failure(self, plan, exc: Exception) -> None:
        """After a failed batched forward pass, run each chunk alone to find the one(s) at fault: those fail,
        the others are left as they were and run again next step (their K/V writes are simply redone).
        If every chunk runs alone, the failure came from the mix: the whole step fails."""
        if len(plan.chunks) == 1:
            self._fail(plan.chunks[0].seq, f"model step failed: {exc}")
            return
        culprits = []
        for chunk in plan.chunks:
            try:
                self.runner.run(StepPlan([chunk]))
            except Exception as solo:  # noqa: BLE001 - this sequence's own failure
                culprits.append((chunk, solo))
        for chunk, solo in culprits or [(c, exc) for c in plan.chunks]:
            self._fail(chunk.seq, f"model step failed: {solo}")
        for chunk in plan.chunks:
            chunk.seq.draft = []  # the next step verifies no stale tree

    def _sample(self, logits: list[torch.Tensor], rows: list[list[RowSampling]], chunks) -> list:
        """Sample all rows at once; if that fails, chunk by chunk, failing only the chunks that fail.
        Returns, per chunk, (token ids, logprobs, alternatives) or None for a failed chunk."""
        try:
            # One chunk (single stream): its rows as they are; cat would copy 0.2 MB of float32 per row.
            batch = logits[0] if len(logits) == 1 else torch.cat(logits)
            result = sample(batch, [r for rs in rows for r in rs])
        except Exception:  # find the request at fault below
            log.exception("sampling failed; retrying request by request")
            results = []
            for chunk, lg, rs in zip(chunks, logits, rows):
                try:
                    one = sample(lg, rs)
                    results.append((one.token_ids.tolist(), one.logprobs.tolist(), list(one.alternatives)))
                except Exception as exc:  # noqa: BLE001
                    self._fail(chunk.seq, f"sampling failed: {exc}")
                    results.append(None)
            return results
        tokens, logprobs, alternatives = (
            result.token_ids.tolist(),
            result.logprobs.tolist(),
            result.alternatives,
        )
        results, offset = [], 0
        for lg in logits:
            n = lg.shape[0]
            results.append(
                (
                    tokens[offset : offset + n],
                    logprobs[offset : offset + n],
                    alternatives[offset : offset + n],
                )
            )
            offset += n
        return results

    def _sample_and_emit(self, sampling: list, speculate: bool) -> None:
        """Choose each sampling row's token, accept drafts, emit tokens, and draft the next trees. A failure
        while handling one request fails that request alone (incomplete_generation)."""
        rows, logits = [], []
        for chunk, chunk_logits, _, _ in sampling:
            n = 1 + len(chunk.draft)
            rows.append(self._row_sampling(chunk))
            logits.append(chunk_logits[-n:])
        sampled = self._sample(logits, rows, [c for c, _, _, _ in sampling])
        to_draft, hidden_rows = [], []
        for (chunk, _, hidden, draft_logits), chunk_sampled, lg, rs in zip(sampling, sampled, logits, rows):
            if chunk_sampled is None or chunk.seq.seq_id not in self._live:
                continue
            try:
                drafted = self._emit(chunk, chunk_sampled, (lg, rs), hidden, draft_logits, speculate)
            except Exception as exc:  # this request's failure (detokenizer, sink...), not the batch's
                log.exception("request %s failed", chunk.seq.seq_id)
                self._fail(chunk.seq, f"generation failed: {exc}")
                continue
            if drafted is not None:
                to_draft.append(chunk.seq)
                hidden_rows.append(drafted)
        for seq in self.scheduler.running:
            seq.draft, seq.next_draft = seq.next_draft, []
        if to_draft:
            for seq, draft in zip(to_draft, self.speculator.draft(torch.stack(hidden_rows), to_draft)):
                seq.draft = draft

    def _emit(self, chunk, sampled, source, hidden, draft_logits, speculate: bool) -> torch.Tensor | None:
        """Accept the chunk's drafts, emit its tokens, and prepare its next tree. `source`: the logits and
        RowSampling its tokens were sampled from. Returns the hidden state to draft from when its heads need
        a separate call, else None."""
        tokens, logprobs, alternatives = sampled
        seq, n = chunk.seq, 1 + len(chunk.draft)
        typical = probs = None
        if chunk.draft and self.speculator.typical and not seq.request.sampling.greedy:
            # Lossy option: a likely enough draft token is kept even where plain decoding drew another.
            probs = processed_probs(*source)
            typical = typical_ok(self.speculator.tree, chunk.draft, probs)
        path = accept(self.speculator.tree, chunk.draft, tokens, typical) if chunk.draft else []
        if chunk.draft:
            self._keep_accepted_kv(seq, chunk.start, path)
            self.speculator.stats.record(len(path))
        emit_rows = [0] + [node + 1 for node in path]
        for k, (row, token) in enumerate(zip(emit_rows, emitted_tokens(path, tokens, chunk.draft))):
            alts = tuple(Alternative(t, self.tokenizer.decode([t]), lp) for t, lp in alternatives[row])
            # A node token kept by typical acceptance was not drawn: its logprob is read from its row.
            logprob = logprobs[row] if token == tokens[row] else math.log(float(probs[row, token]))
            if not self._append_token(seq, token, logprob, alts, skipped=k > 0):
                break
        if not speculate or seq.seq_id not in self._live:
            return None
        if draft_logits is not None:  # the heads' logits came with this step's model call
            row = emit_rows[-1] if chunk.draft else 0
            seq.next_draft = self.speculator.tree_from_logits(
                draft_logits.logits[row], seq, draft_logits.vocab
            )
            return None
        return hidden[-n:][emit_rows[-1]]

    def _row_sampling(self, chunk: ScheduledChunk) -> list[RowSampling]:
        """The root row, then each tree node's row, sampled as plain decoding would sample that position:
        same history (penalties), same random numbers (seed, token index)."""
        seq = chunk.seq
        params = seq.request.sampling
        paths = [[]] + [[chunk.draft[a] for a in chain] for chain in self._tree_ancestors(len(chunk.draft))]
        rows = []
        for path in paths:
            history = None
            if params.needs_history:
                history = torch.tensor(seq.token_ids + path, dtype=torch.long, device=self.device)
            rows.append(
                RowSampling(
                    params, seq.seed, seq.num_generated + len(path), history, seq.request.top_n_tokens
                )
            )
        return rows

    def _tree_ancestors(self, n: int) -> tuple:
        return self.speculator.tree.ancestors[:n] if n else ()

    def _keep_accepted_kv(self, seq: Sequence, root: int, path: list[int]) -> None:
        """Accepted nodes wrote their K/V to scratch slots: swap those into the sequence's positions."""
        seq.num_cached += len(path)
        for depth, node in enumerate(path, start=1):
            pos = root + depth
            if pos >= len(seq.slots):  # beyond max_new_tokens: never emitted
                break
            seq.slots[pos], seq.node_slots[node] = seq.node_slots[node], seq.slots[pos]

    def _append_token(self, seq: Sequence, token: int, logprob: float, alts, skipped: bool) -> bool:
        """Emit one token; returns whether the sequence goes on."""
        live = self._live.get(seq.seq_id)
        if live is None:
            return False
        seq.token_ids.append(token)
        seq.skipped_tokens += skipped
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
        return reason is None

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
