"""Turn a distillation run's record file into a training file: `python -m gorgon.training.prepare`.

Greedy answers cut at `--max-tokens` are mostly a small model's degenerate loops (measured on the embedded
model: 93% of its cut answers repeat 6-word runs, against a median 2% for answers that ended). Training the
heads on hundreds of tokens of loop per conversation teaches them little about real answers, so a cut answer
keeps only the text before its loop begins. Prompts kept for tuning (`--exclude`) never enter training.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

LOOP_WORDS = 8  # a run of this many words seen before marks the start of a loop


def loop_start(text: str, n: int = LOOP_WORDS) -> int | None:
    """Character offset where the first repeated run of `n` words starts its second occurrence, or None."""
    words = [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]
    seen: set[tuple[str, ...]] = set()
    for i in range(len(words) - n + 1):
        gram = tuple(w for _, w in words[i : i + n])
        if gram in seen:
            return words[i][0]
        seen.add(gram)
    return None


STUCK_WORDS = 48  # an answer whose last this many words only repeat earlier runs is stuck in a loop


def stuck(text: str, n: int = LOOP_WORDS, tail: int = STUCK_WORDS) -> bool:
    """Whether every n-word run among the last `tail` words appeared earlier in the text: a loop that will
    not end. (One repeated run is not enough: finished answers repeat phrases too, and code repeats lines.)"""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) <= tail:
        return False
    first: dict[tuple[str, ...], int] = {}
    for i, gram in enumerate(grams):
        first.setdefault(gram, i)
    return all(first[gram] < i for i, gram in enumerate(grams[-tail:], len(grams) - tail))


class LoopWatch:
    """Watches an answer as it streams in and says where its loop began once it is stuck in one:
    distillation stops generating there (`gorgon distill --stop-loops`) instead of running to
    `--max-tokens`; the answer would have hit that cap, and `prepare` would have cut it at the same place.
    Checks every `every` pieces (each check scans the whole text)."""

    def __init__(self, every: int = 16) -> None:
        self.text, self.every, self.pieces = "", every, 0

    def feed(self, piece: str) -> int | None:
        """Append a piece of the answer; the loop's start offset once it is stuck in one, else None."""
        self.text += piece
        self.pieces += 1
        if self.pieces % self.every or not stuck(self.text):
            return None
        return loop_start(self.text)


def prepare(records: list[dict], exclude: set[str], min_chars: int = 20) -> tuple[list, dict]:
    """(conversations as message lists, counts of what was kept, trimmed and dropped)."""
    out, counts = [], {"kept": 0, "trimmed": 0, "dropped_excluded": 0, "dropped_short": 0}
    for rec in records:
        messages = [dict(m) for m in rec["messages"]]
        if any(m["role"] == "user" and m["content"] in exclude for m in messages):
            counts["dropped_excluded"] += 1
            continue
        answers = [m for m in messages if m["role"] == "assistant"]
        # Which answers were cut: one flag per answer in newer records, else the conversation's (its last).
        cut_flags = rec.get("truncated_turns") or [False] * (len(answers) - 1) + [bool(rec.get("truncated"))]
        for answer, cut_flag in zip(answers, cut_flags, strict=False):
            cut = loop_start(answer["content"]) if cut_flag else None
            if cut is not None:
                answer["content"] = answer["content"][:cut].rstrip()
                counts["trimmed"] += 1
        if not answers or min(len(m["content"]) for m in answers) < min_chars:
            counts["dropped_short"] += 1
            continue
        out.append(messages)
        counts["kept"] += 1
    return out, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", help="a `gorgon distill` record file (OUT.done.jsonl)")
    parser.add_argument("output", help="training file: JSON list of message lists")
    parser.add_argument("--exclude", default=None, help="JSON list of prompts to keep out (tuning prompts)")
    args = parser.parse_args()
    lines = Path(args.records).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    exclude = set(json.loads(Path(args.exclude).read_text())) if args.exclude else set()
    conversations, counts = prepare(records, exclude)
    Path(args.output).write_text(json.dumps(conversations, ensure_ascii=False))
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
