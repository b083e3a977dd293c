"""Markers and answers of the fake OpenAI-compatible server used by the distillation tests."""

from __future__ import annotations

FLAKY = "FLAKY"  # HTTP 500 for the first `flaky_failures` calls carrying it, then fine
BROKEN = "BROKEN"  # HTTP 500, always
REFUSED = "REFUSED"  # HTTP 422 (a permanent error), always
LONG = "LONG"  # answered, but cut at max tokens (finish_reason "length")
LOOP = "LOOP"  # answered with an intro, then one sentence over and over up to max tokens (words as tokens)
LOOP_INTRO = "Here is my answer to that."
LOOP_SENTENCE = "The same eight words come back again and again."


def loop_words(max_tokens: int) -> list[str]:
    """The LOOP answer as its max_tokens "tokens" (one word and its space each)."""
    words = LOOP_INTRO.split() + LOOP_SENTENCE.split() * max_tokens
    return [w + " " for w in words[:max_tokens]]


def fake_answer(messages: list[dict]) -> str:
    """What the fake model says: which user turn this is, what it answers, and how many assistant turns
    (and which) it was shown, so tests can check the context it got."""
    last = messages[-1]["content"]
    seen = [m["content"] for m in messages if m["role"] == "assistant"]
    return f"reply {len(seen) + 1} to <{last}> after {seen}"
