"""An engine with `AsyncEngine`'s interface and no model: it "generates" a fixed script, token by token.

Deterministic, so tests can predict every token: greedy requests emit the script from its start; sampled
requests start at an offset given by their seed, and their log-probabilities depend on the seed (so best-of
has a clear winner). It records what it saw: every request, and which ones were aborted (closed early).

Magic inputs: an adapter id of `missing/adapter` fails admission (424); a prompt containing `FAIL_MIDWAY`
fails after two tokens (an `ErrorOutput`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import torch

from gorgon.config import EngineConfig
from gorgon.engine.request import (
    Alternative,
    ErrorOutput,
    FinalOutput,
    GenerationRequest,
    PrefillToken,
    TokenOutput,
)
from gorgon.errors import GenerationError, OverloadedError

SCRIPT = " The quick brown fox jumps over the lazy dog. Hello world! How are you today?"
MISSING_ADAPTER = "missing/adapter"
FAIL_MIDWAY = "FAIL_MIDWAY"


@dataclass(frozen=True)
class FakeStats:
    queue_length: int
    running: int
    batch_size: int
    generated_tokens: int


class FakeEngine:
    def __init__(
        self,
        tokenizer,
        config: EngineConfig | None = None,
        model_id: str = "fake/tiny-model",
        token_delay: float = 0.0,
        skip_every: int = 0,
        eos_after: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config or EngineConfig(
            max_input_length=64, max_total_tokens=128, max_batch_total_tokens=1024
        )
        self.model_id = model_id
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.eos_token_ids = {tokenizer.eos_token_id}
        self.healthy = True
        self.token_delay = token_delay  # seconds per token, to leave time for disconnects
        self.skip_every = skip_every  # mark tokens as skipped (speculated) except every n-th
        self.eos_after = eos_after  # emit EOS as the token with this index
        self.script_ids: list[int] = tokenizer(SCRIPT, add_special_tokens=False)["input_ids"]
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.completed: list[str] = []
        self.in_flight = 0
        self.generated = 0

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def stats(self) -> FakeStats:
        return FakeStats(
            queue_length=0, running=self.in_flight, batch_size=self.in_flight, generated_tokens=self.generated
        )

    def expected_text(self, n: int, offset: int = 0) -> str:
        """What a request that generates `n` script tokens from `offset` answers."""
        ids = [self.script_ids[(offset + i) % len(self.script_ids)] for i in range(n)]
        return self.tokenizer.decode(ids)

    async def generate(
        self, request: GenerationRequest
    ) -> AsyncIterator[TokenOutput | FinalOutput | ErrorOutput]:
        if self.in_flight >= self.config.max_concurrent_requests:
            raise OverloadedError()
        if request.adapter_id == MISSING_ADAPTER:
            raise GenerationError(f"adapter {request.adapter_id!r} not found")
        self.in_flight += 1
        self.requests.append(request)
        done = False
        try:
            sampling = request.sampling
            seed = sampling.seed if sampling.seed is not None else random.getrandbits(63)
            offset = 0 if sampling.greedy else seed % len(self.script_ids)
            prompt_text = self.tokenizer.decode(request.prompt_ids)
            ids: list[int] = []
            text = ""
            tokens: list[TokenOutput] = []
            reason = "length"
            for i in range(request.stopping.max_new_tokens):
                await asyncio.sleep(self.token_delay)
                if FAIL_MIDWAY in prompt_text and i == 2:
                    done = True
                    yield ErrorOutput("Request failed during generation: fake failure", "generation")
                    return
                eos = self.eos_after is not None and i == self.eos_after
                tid = (
                    self.tokenizer.eos_token_id
                    if eos
                    else self.script_ids[(offset + i) % len(self.script_ids)]
                )
                ids.append(tid)
                new_text = self.tokenizer.decode(ids, skip_special_tokens=True)
                piece, text = new_text[len(text) :], new_text
                alts = tuple(
                    Alternative(a, self.tokenizer.decode([a]), -1.0 - k)
                    for k, a in enumerate(self.script_ids[i + 1 : i + 1 + request.top_n_tokens])
                )
                token = TokenOutput(
                    id=tid,
                    text=piece,
                    logprob=-0.01 * (seed % 97) - 0.1 * i,
                    special=eos,
                    skipped=bool(self.skip_every) and i % self.skip_every != 0,
                    alternatives=alts,
                )
                finish = None
                if eos and not request.stopping.ignore_eos_token:
                    finish = "eos_token"
                hits = [text.find(s) + len(s) for s in request.stopping.stop_sequences if s in text]
                if finish is None and hits:
                    finish, text = "stop_sequence", text[: min(hits)]
                if finish is None and i + 1 == request.stopping.max_new_tokens:
                    finish = "length"
                token = replace(token, finish_reason=finish)
                tokens.append(token)
                self.generated += 1
                yield token
                if finish is not None:
                    reason = finish
                    break
            prefill = ()
            if request.prefill_logprobs:
                prefill = tuple(
                    PrefillToken(t, self.tokenizer.decode([t]), None if j == 0 else -0.5)
                    for j, t in enumerate(request.prompt_ids)
                )
            final = FinalOutput(
                generated_text=text,
                finish_reason=reason,
                prompt_tokens=len(request.prompt_ids),
                generated_tokens=len(tokens),
                skipped_tokens=sum(t.skipped for t in tokens),
                seed=None if sampling.greedy else seed,
                prefill=prefill,
                tokens=tuple(tokens),
            )
            done = True
            self.completed.append(request.request_id)
            yield final
        finally:
            self.in_flight -= 1
            if not done:
                self.aborted.append(request.request_id)
