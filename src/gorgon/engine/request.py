"""What a request asks of the engine, and what the engine streams back.

These are plain data: the server builds a `GenerationRequest` after validation, the engine answers with a
stream of `TokenOutput` and one closing `FinalOutput` (or `ErrorOutput`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. `do_sample=False` (or temperature 0) means greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    typical_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None: the engine picks one (reported back)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        """Whether the logits processors look at earlier tokens (penalties)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos_token: bool = False


@dataclass
class GenerationRequest:
    """A validated request: token ids in, everything the engine needs to run and report."""

    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    # How many top alternatives to report per token (LoRAX `return_k_alternatives`); 0: none.
    top_n_tokens: int = 0
    # Report log-probabilities of the prompt tokens (`decoder_input_details`).
    prefill_logprobs: bool = False
    adapter_id: str | None = None
    adapter_source: str = "hub"  # hub | local | s3 | pbase
    api_token: str | None = None  # for private hub adapters; never logged
    request_id: str = ""


@dataclass(frozen=True)
class Alternative:
    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenOutput:
    """One generated token, as streamed. `text` is the clean UTF-8 text this token completes (may be "")."""

    id: int
    text: str
    logprob: float
    special: bool
    skipped: bool = False  # came from accepted speculation (every token after the first of a step)
    alternatives: tuple[Alternative, ...] = ()
    # Set on the request's last token (a FinalOutput follows at once): lets a stream put the closing
    # details on this token's event without waiting.
    finish_reason: str | None = None


@dataclass(frozen=True)
class PrefillToken:
    id: int
    text: str
    logprob: float | None  # None for the first prompt token


@dataclass(frozen=True)
class FinalOutput:
    """Closes a request's stream."""

    generated_text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int
    seed: int | None
    prefill: tuple[PrefillToken, ...] = ()
    tokens: tuple[TokenOutput, ...] = field(default=())


@dataclass(frozen=True)
class ErrorOutput:
    """Closes a request's stream when it failed after admission."""

    message: str
    error_type: str = "incomplete_generation"
