"""Magpie synthesis: the model writes its own user instructions.

Given only the chat template's text up to the start of a user turn (e.g. ChatML's
`<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n`), an instruction-tuned model continues with a user
request, which ends with the template's end-of-turn marker. That prefix is derived from the tokenizer's own
template (a conversation with a sentinel user message, cut at the sentinel), so any chat model works.

Samples are then filtered (unfinished, too short or long, template leaks, degenerate repetition) and
deduplicated: exactly after normalisation, and near-duplicates by word 5-gram Jaccard, found through
MinHash-LSH so the cost stays linear in the number of instructions.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gorgon.training.chat_backends import (
    BackendError,
    ChatBackend,
    Completion,
    RetryPolicy,
    call_with_retries,
)
from gorgon.training.seeds import Seed, SeedSampler

log = logging.getLogger(__name__)

SENTINEL = "\u2063GORGON_USER_SENTINEL_7f3a\u2063"


# --- the user-turn prefix -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserTurnTemplate:
    prefix: str  # the rendered conversation up to where the user's words begin
    end_of_turn: str  # what the template writes after the user's words (stripped), e.g. "<|im_end|>"
    has_system: bool  # False when the template refused a system message and the prefix has none


def user_turn_template(tokenizer: Any, system: str | None) -> UserTurnTemplate:
    """Render `[system, user: SENTINEL]` with the tokenizer's chat template and cut at the sentinel.

    Templates that reject system messages (they raise) are rendered without one.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("Magpie synthesis needs a chat model: this tokenizer has no chat template")
    user = {"role": "user", "content": SENTINEL}
    attempts = [[{"role": "system", "content": system}, user], [user]] if system is not None else [[user]]
    error: Exception | None = None
    for messages in attempts:
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        except Exception as e:  # noqa: BLE001 - jinja's TemplateError, or the template's raise_exception
            error = e
            continue
        if text.count(SENTINEL) != 1:
            raise ValueError("the chat template does not write the user message verbatim once")
        prefix, suffix = text.split(SENTINEL)
        end = suffix.strip() or suffix
        if not end:
            raise ValueError(
                "the chat template writes nothing after a user message: no end of turn to stop at"
            )
        return UserTurnTemplate(prefix=prefix, end_of_turn=end, has_system=len(messages) == 2)
    raise ValueError(f"the chat template cannot render a user message: {error}")


# --- filtering ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JunkFilter:
    min_words: int = 3
    min_chars: int = 12
    max_chars: int = 2000
    markers: tuple[str, ...] = ()  # strings that must not appear (special tokens, role markers)

    def reason(self, text: str, completion: Completion) -> str | None:
        """Why `text` is not a usable instruction, or None."""
        if completion.truncated:
            return "unfinished"  # never reached the end of the user turn
        words = text.split()
        if len(words) < self.min_words or len(text) < self.min_chars:
            return "too_short"
        if len(text) > self.max_chars:
            return "too_long"
        if any(m and m in text for m in self.markers):
            return "template_leak"
        if len(words) >= 20 and len({w.lower() for w in words}) < 0.3 * len(words):
            return "repetitive"
        return None


def template_markers(tokenizer: Any, template: UserTurnTemplate) -> tuple[str, ...]:
    special = [t for t in getattr(tokenizer, "all_special_tokens", []) if len(t) > 1]
    return tuple(dict.fromkeys([*special, template.end_of_turn]))


# --- deduplication --------------------------------------------------------------------------------------------
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_MERSENNE = (1 << 61) - 1


def normalise_text(text: str) -> str:
    """Lowercase, NFKC, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCT.sub(" ", text).split())


def shingles(text: str, n: int = 5) -> frozenset[str]:
    words = normalise_text(text).split()
    k = min(n, len(words))
    if k == 0:
        return frozenset()
    return frozenset(" ".join(words[i : i + k]) for i in range(len(words) - k + 1))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class Deduplicator:
    """Exact (normalised) and near-duplicate (word n-gram Jaccard >= threshold) detection.

    MinHash signatures split into LSH bands find candidates; the true Jaccard decides. With 16 bands of 4
    rows, a pair at Jaccard 0.7 is a candidate with probability ~0.99.
    """

    def __init__(self, threshold: float = 0.7, n: int = 5, bands: int = 16, rows: int = 4, seed: int = 0):
        self.threshold, self.n, self.bands, self.rows = threshold, n, bands, rows
        rng = random.Random(seed)
        self._perms = [(rng.randrange(1, _MERSENNE), rng.randrange(_MERSENNE)) for _ in range(bands * rows)]
        self._exact: set[str] = set()
        self._buckets: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        self._sets: list[frozenset[str]] = []

    def _signature(self, sh: frozenset[str]) -> list[int]:
        hashes = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in sh]
        return [min((a * h + b) % _MERSENNE for h in hashes) for a, b in self._perms]

    def _bands(self, sh: frozenset[str]) -> list[tuple[int, tuple[int, ...]]]:
        sig = self._signature(sh)
        return [(i, tuple(sig[i * self.rows : (i + 1) * self.rows])) for i in range(self.bands)]

    def add(self, text: str) -> str | None:
        """Record `text` unless it duplicates an earlier one; returns None (new), "exact" or "near"."""
        norm = normalise_text(text)
        if norm in self._exact:
            return "exact"
        sh = shingles(text, self.n)
        bands = self._bands(sh) if sh else []
        candidates = {j for band in bands for j in self._buckets.get(band, ())}
        if any(jaccard(sh, self._sets[j]) >= self.threshold for j in candidates):
            return "near"
        self._exact.add(norm)
        idx = len(self._sets)
        self._sets.append(sh)
        for band in bands:
            self._buckets.setdefault(band, []).append(idx)
        return None


# --- the synthesis loop ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthesisConfig:
    n: int
    concurrency: int = 8
    temperature: float = 1.0
    max_tokens: int = 160  # per instruction; longer ones count as unfinished
    seed: int = 0
    max_samples: int | None = None  # give up after this many samples (default 5n + 50)
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("--synthesize must be at least 1")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")

    @property
    def sample_limit(self) -> int:
        return self.max_samples if self.max_samples is not None else 5 * self.n + 50


@dataclass(frozen=True)
class Instruction:
    text: str
    sample_index: int
    seed: Seed


@dataclass
class SynthesisStats:
    sampled: int = 0
    kept: int = 0
    failed: int = 0  # requests that errored out after retries
    junk: Counter = field(default_factory=Counter)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    generated_tokens: int = 0
    elapsed_s: float = 0.0

    @property
    def unique_per_100(self) -> float:
        """Kept instructions per 100 samples (junk and duplicates both count against it)."""
        return 100.0 * self.kept / self.sampled if self.sampled else 0.0

    @property
    def unique_per_100_wellformed(self) -> float:
        """Kept per 100 well-formed samples: how diverse the usable ones are."""
        wellformed = self.sampled - sum(self.junk.values())
        return 100.0 * self.kept / wellformed if wellformed else 0.0

    def summary(self) -> str:
        junk = ", ".join(f"{k} {v}" for k, v in sorted(self.junk.items())) or "none"
        rate = self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0
        return (
            f"sampled {self.sampled}, kept {self.kept} ({self.unique_per_100:.1f} unique per 100 sampled, "
            f"{self.unique_per_100_wellformed:.1f} per 100 well-formed); junk: {junk}; duplicates: "
            f"{self.exact_duplicates} exact, {self.near_duplicates} near; failed requests {self.failed}; "
            f"{self.generated_tokens} tokens in {self.elapsed_s:.1f}s ({rate:.1f} tokens/s)"
        )


class Synthesizer:
    """Samples instructions from `backend` until `config.n` are kept (or the sample limit is reached)."""

    def __init__(self, backend: ChatBackend, tokenizer: Any, sampler: SeedSampler, config: SynthesisConfig):
        self.backend, self.tokenizer, self.sampler, self.config = backend, tokenizer, sampler, config
        self.dedup = Deduplicator()
        self.stats = SynthesisStats()
        probe = user_turn_template(tokenizer, "You are a helpful assistant.")
        if not probe.has_system and sampler.mode != "none":
            log.warning("this chat template takes no system message: topic and task hints are dropped")
        self.filter = JunkFilter(markers=template_markers(tokenizer, probe))
        # A server tokenizes a completion prompt with special tokens: a BOS the template wrote would be doubled.
        bos = getattr(tokenizer, "bos_token", None)
        adds_bos = bool(bos) and tokenizer("", add_special_tokens=True)["input_ids"][:1] == [
            tokenizer.bos_token_id
        ]
        self.strip_bos = bos if adds_bos and backend.adds_special_tokens else None
        log.info("Magpie user-turn prefix: %r (ends at %r)", probe.prefix, probe.end_of_turn)

    def preload(self, texts: list[str]) -> None:
        """Instructions kept by an earlier run: later samples that duplicate them are not kept."""
        for t in texts:
            self.dedup.add(t)

    async def sample(self, index: int) -> tuple[Seed, str, Completion]:
        rng = random.Random(f"{self.config.seed}:{index}")
        seed = self.sampler.draw(rng)
        template = user_turn_template(self.tokenizer, seed.system)
        prompt = template.prefix + seed.opener
        if self.strip_bos and prompt.startswith(self.strip_bos):
            prompt = prompt[len(self.strip_bos) :]
        completion = await call_with_retries(
            lambda: self.backend.complete(
                prompt,
                max_tokens=self.config.max_tokens,
                temperature=self.config.temperature,
                stop=(template.end_of_turn,),
                seed=self.config.seed * 1_000_003 + index,
            ),
            self.config.retry,
            f"sample {index}",
        )
        text = completion.text
        if template.end_of_turn in text:  # servers that return the stop sequence
            text = text[: text.index(template.end_of_turn)]
        return seed, (seed.opener + text).strip(), completion

    def judge(self, seed: Seed, text: str, completion: Completion) -> bool:
        """Count one sample; True if it is kept."""
        self.stats.sampled += 1
        self.stats.generated_tokens += completion.completion_tokens
        reason = self.filter.reason(text, completion)
        if reason is None and seed.opener and len(text.split()) < len(seed.opener.split()) + 3:
            reason = "too_short"  # the opener alone is not an instruction
        if reason is not None:
            self.stats.junk[reason] += 1
            return False
        dup = self.dedup.add(text)
        if dup == "exact":
            self.stats.exact_duplicates += 1
        elif dup == "near":
            self.stats.near_duplicates += 1
        else:
            self.stats.kept += 1
        return dup is None

    async def run(self, start_index: int, on_keep: Callable[[Instruction], None]) -> SynthesisStats:
        """Sample with `concurrency` workers from `start_index` on; `on_keep` sees each kept instruction."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        indices = itertools.count(start_index)
        limit = start_index + self.config.sample_limit
        done = asyncio.Event()

        async def worker() -> None:
            while not done.is_set():
                index = next(indices)
                if index >= limit:
                    return
                try:
                    seed, text, completion = await self.sample(index)
                except BackendError as e:
                    self.stats.failed += 1
                    log.warning("sample %d failed: %s", index, e)
                    continue
                if done.is_set():
                    return
                if self.judge(seed, text, completion):
                    on_keep(Instruction(text, index, seed))
                    if self.stats.kept >= self.config.n:
                        done.set()

        tasks = [asyncio.create_task(worker()) for _ in range(self.config.concurrency)]
        waiter = asyncio.create_task(done.wait())
        try:
            while not done.is_set():
                for t in tasks:
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # a bug, not a failed request: do not hide it
                pending = [t for t in tasks if not t.done()]
                if not pending:
                    break
                await asyncio.wait([waiter, *pending], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in [*tasks, waiter]:
                t.cancel()  # in-flight samples are no longer needed: abort them (frees engine slots)
            await asyncio.gather(*tasks, waiter, return_exceptions=True)
        self.stats.elapsed_s = loop.time() - t0
        return self.stats
