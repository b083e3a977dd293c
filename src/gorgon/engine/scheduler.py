"""Continuous batching: which sequences run in the next step, and with which tokens.

Pure bookkeeping (no tensors): it hands the runner a `StepPlan`. Decodes of running sequences always go in;
prefills fill the rest of the step's token budget, in arrival order, chunked where a prompt does not fit.
A sequence is admitted only when its whole KV reservation (prompt + max_new_tokens) fits, so a running
sequence never has to be preempted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from gorgon.config import EngineConfig
from gorgon.engine.kv_cache import SlotAllocator
from gorgon.engine.sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # logical position of the first token
    tokens: list[int]
    want_all_logits: bool  # every row's logits (prompt logprobs), else only the last row's
    samples: bool  # the last row yields the sequence's next token
    draft: list[int] = field(default_factory=list)  # candidate tree tokens verified after the (one) token
    # Medusa v2 heads whose next drafts ride along in this step's lm_head call (None: drafted separately).
    draft_heads: Any = None

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass
class StepPlan:
    chunks: list[ScheduledChunk]

    @property
    def num_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: SlotAllocator, tree_size: int = 0) -> None:
        self.config = config
        self.allocator = allocator
        self.tree_size = tree_size  # scratch KV slots each sequence keeps for its candidate tree
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, seq: Sequence) -> None:
        """Release a sequence (finished or aborted) and its KV slots."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.slots + seq.node_slots)
        seq.slots, seq.node_slots = [], []
        seq.status = Status.FINISHED

    def schedule(self, speculate: bool = False) -> StepPlan | None:
        """`speculate`: decodes carry their sequence's draft (candidate tree) for verification."""
        chunks = [self._decode_chunk(s, speculate) for s in self.running if not s.in_prefill]
        budget = self.config.max_batch_prefill_tokens
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                chunks.append(self._prefill_chunk(seq, budget))
                budget -= len(chunks[-1].tokens)
        while self.waiting and budget > 0 and self._admit(self.waiting[0]):
            seq = self.waiting.popleft()
            chunks.append(self._prefill_chunk(seq, budget))
            budget -= len(chunks[-1].tokens)
        return StepPlan(chunks) if chunks else None

    def _admit(self, seq: Sequence) -> bool:
        if self.allocator.num_free < seq.max_tokens + self.tree_size:
            return False
        seq.slots = self.allocator.allocate(seq.max_tokens)
        seq.node_slots = self.allocator.allocate(self.tree_size)
        seq.status = Status.RUNNING
        self.running.append(seq)
        return True

    @staticmethod
    def _decode_chunk(seq: Sequence, speculate: bool) -> ScheduledChunk:
        pos = len(seq.token_ids) - 1
        draft = seq.draft if speculate else []
        return ScheduledChunk(
            seq, pos, [seq.token_ids[pos]], want_all_logits=False, samples=True, draft=draft
        )

    @staticmethod
    def _prefill_chunk(seq: Sequence, budget: int) -> ScheduledChunk:
        start = seq.num_cached
        end = min(seq.num_prompt, start + budget)
        return ScheduledChunk(
            seq,
            start,
            seq.token_ids[start:end],
            want_all_logits=seq.request.prefill_logprobs,
            samples=end == seq.num_prompt,
        )
