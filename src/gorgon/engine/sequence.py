"""A request's state inside the engine: its tokens, its KV slots, and how far it has got."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from gorgon.engine.request import GenerationRequest, PrefillToken, TokenOutput

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request: GenerationRequest
    seed: int
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_cached: int = 0  # tokens whose K/V are in the cache
    slots: list[int] = field(default_factory=list)  # slot of each logical position
    # Scratch slots for the candidate tree's nodes; an accepted node's slot is swapped into `slots`.
    node_slots: list[int] = field(default_factory=list)
    draft: list[int] = field(default_factory=list)  # candidate tree tokens for the next step (may be empty)
    next_draft: list[int] = field(default_factory=list)  # drafted during a step, becomes `draft` after it
    medusa: Any = None  # the request's own Medusa heads (None: the server's default speculator)
    lora: Any = None  # the request's LoRA adapter (gorgon.adapters.lora.LoraAdapter), or None
    outputs: list[TokenOutput] = field(default_factory=list)
    prefill: list[PrefillToken] = field(default_factory=list)
    skipped_tokens: int = 0
    finish_reason: str | None = None
    aborted: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < self.num_prompt

    @property
    def max_tokens(self) -> int:
        """Upper bound of this sequence's length: its KV reservation."""
        return self.num_prompt + self.request.stopping.max_new_tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]
