"""Measured decode-step times, by load and by whether the step verified drafts: what the speculation policy
trusts over its start-up estimate.

The start-up table (`StepCost`) times bare forward passes; a real step also pays for the heads, LoRA
adapters, longer contexts, sampling and acceptance. So the engine times every pure decode step and keeps,
per number of decoding sequences, the recent steps with drafts and those without; a step's cost is the
fastest of its last few (`window`): on a shared machine, interference (CPU steal, other processes) only ever
adds time, and a running mean of 3-5 noisy steps flipped verdicts near break-even (8 concurrent code
requests, drafts ~0.8x: a dozen drafted steps whenever the mean dipped, *script*). The policy compares the
two once both exist and, now and then, runs a few steps of the choice it is not making, so that a figure it
has stopped refreshing cannot keep a stale verdict forever. A load not measured yet borrows the
nearest measured load's ratio (`nearest_ratio`): loads pass quickly as requests come and go, and each one
measured from scratch would pay for the wrong choice a few steps at a time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass
class _Recent:
    samples: deque  # the last `window` step times (seconds)
    count: int = 0  # steps recorded in all


class StepTimes:
    """Recent step seconds keyed by (decoding sequences, speculated); a key's cost is its fastest recent step."""

    def __init__(
        self,
        window: int = 8,
        min_samples: int = 3,
        explore_every: int = 64,
        burst: int = 3,
        clear_margin: float = 1.1,
    ):
        self.window = window  # recent steps kept per key: a load's cost drifts as contexts grow
        self.min_samples = min_samples  # before this many, a figure is not trusted
        self.explore_every = explore_every  # decisions at one load between re-measurements of the other mode
        self.burst = burst  # decisions one re-measurement takes (the first step after a switch is atypical)
        # A throughput ratio beyond this (or its inverse) is a clear verdict. At 8 concurrent code requests
        # drafts measured 0.78x; under a 1.25 margin that was close, and its bursts every 64 steps cost ~2%.
        # (At 8 chat requests they measure ~0.5x: re-measured every 256 steps that still cost ~3%.)
        self.clear_margin = clear_margin
        self._recent: dict[tuple[int, bool], _Recent] = {}
        self._since: dict[int, int] = {}  # decisions at this load since the last exploration burst began
        self._exploring: dict[int, tuple[bool, int]] = {}  # load -> (mode explored, decisions left)

    def record(self, decoding: int, speculated: bool, seconds: float) -> None:
        key = (decoding, speculated)
        if key not in self._recent:
            self._recent[key] = _Recent(deque(maxlen=self.window))
        recent = self._recent[key]
        recent.samples.append(seconds)
        recent.count += 1

    def seconds(self, decoding: int, speculated: bool) -> float | None:
        """The step time at this load and mode (its fastest recent step), or None while too few were timed."""
        recent = self._recent.get((decoding, speculated))
        return min(recent.samples) if recent is not None and recent.count >= self.min_samples else None

    def nearest_ratio(self, decoding: int) -> tuple[int, float] | None:
        """(load, step time with drafts / without) at the nearest load where both are trusted (the lighter
        one on a tie), or None while there is none: what neighbouring loads say about an unmeasured one."""
        loads = {d for d, _ in self._recent}
        measured = [
            d for d in loads if self.seconds(d, True) is not None and self.seconds(d, False) is not None
        ]
        if not measured:
            return None
        load = min(measured, key=lambda d: (abs(d - decoding), d))
        return load, self.seconds(load, True) / self.seconds(load, False)

    def decide(self, decoding: int, gain: float) -> bool:
        """Whether to speculate at this load, given the policy's estimate of what drafts `gain` (throughput
        with / without them): yes when gain > 1, except during a short burst of the other choice now and
        then. A close call (gain within `clear_margin` of 1) measures the other choice at once while it has
        no trusted figure, then every `explore_every` decisions. A clear verdict re-measures every 4 x
        `explore_every` decisions times how many `clear_margin`s it is from even (up to 8): re-measuring a 2x
        verdict costs the most and is the least likely to change it. Its first measurement waits
        `explore_every` decisions when the verdict is for drafts (a load that passes quickly never pays for
        one), and as long as a re-measurement when it is against them: a step with drafts costs up to 3x a
        plain one at 8 sequences (*script*: 8 chat requests lost ~4% to a dozen such steps at 3 loads), and
        the estimate without measurements leaves out the heads' and sampling's cost, so it errs towards
        drafts, never away from them."""
        preferred = gain > 1.0
        since = self._since.get(decoding, 0) + 1
        mode, left = self._exploring.get(decoding, (preferred, 0))
        if left > 0:
            self._exploring[decoding] = (mode, left - 1)
            self._since[decoding] = since
            return mode
        other = not preferred
        close = 1 / self.clear_margin < gain < self.clear_margin
        margins = abs(math.log(gain)) / math.log(self.clear_margin) if gain > 0 else 8.0
        clear_every = round(4 * self.explore_every * min(margins, 8.0))
        if self.seconds(decoding, other) is None:
            trusted = self.seconds(decoding, preferred) is not None  # measure the other once this one is
            if close:
                every = self.burst if trusted else self.explore_every
            else:
                every = self.explore_every if preferred else clear_every
        else:
            every = self.explore_every if close else clear_every
        if since >= every:
            self._since[decoding] = 0
            self._exploring[decoding] = (other, self._burst_for(decoding, other) - 1)
            return other
        self._since[decoding] = since
        return preferred

    def _burst_for(self, decoding: int, mode: bool) -> int:
        """Decisions an exploration of `mode` takes: `burst`, or, while its figure is not trusted yet, enough
        for the missing samples, so that one burst makes it trusted (turning drafts on, the first step records
        none: no sequence has a draft yet)."""
        recent = self._recent.get((decoding, mode))
        missing = self.min_samples - (recent.count if recent is not None else 0)
        return max(self.burst, missing + (1 if mode else 0))
