"""Markers and answers of the fake OpenAI-compatible server used by the distillation tests."""

from __future__ import annotations

FLAKY = "FLAKY"  # HTTP 500 for the first `flaky_failures` calls carrying it, then fine
BROKEN = "BROKEN"  # HTTP 500, always
REFUSED = "REFUSED"  # HTTP 422 (a permanent error), always
LONG = "LONG"  # answered, but cut at max tokens (finish_reason "length")


def fake_answer(messages: list[dict]) -> str:
    """What the fake model says: which user turn this is, what it answers, and how many assistant turns
    (and which) it was shown, so tests can check the context it got."""
    last = messages[-1]["content"]
    seen = [m["content"] for m in messages if m["role"] == "assistant"]
    return f"reply {len(seen) + 1} to <{last}> after {seen}"
