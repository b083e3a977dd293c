"""Candidate trees for Medusa speculation.

A tree is a list of paths ("medusa choices"): the path (0, 2) is the node whose token is the top-1 guess of
head 0 followed by the top-3 guess of head 1. The root (not listed) is the token the base model just chose.
Each node sits at position root + depth; it may attend only to the prefix, the root and its ancestors.

A tree may also carry `prune_below`: each step, the nodes at the end of the list (the deepest) whose drafts
score below it (the sum along the node's path of each guess's head log-probability + the n-gram table's
weighted log-frequency) are not verified. On this CPU a verified row costs ~0.7-1 ms of a 11-15 ms step
(the linear layers are compute-bound past ~4 rows), so a deep node is worth its row only when its drafts
are likely: a fixed tree spends it on every step. Stored as `{"paths": [...], "prune_below": x}`; a
plain list of paths is a tree without pruning.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

# Built-in trees. "chain-K" is what LoRAX, TGI and vLLM do: the top-1 guess of each head. The others spend a
# few more verification rows on the likeliest alternatives of the first heads, where acceptance is highest.
BUILTIN_TREES: dict[str, list[tuple[int, ...]]] = {
    "chain-1": [(0,)],
    "chain-2": [(0,), (0, 0)],
    "chain-3": [(0,), (0, 0), (0, 0, 0)],
    "chain-4": [(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)],
    "tree-8": [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 0, 1)],
    "tree-16": [
        (0,), (1,), (2,), (3,),
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0),
        (0, 0, 0, 0), (0, 0, 0, 1),
    ],
}  # fmt: skip


@dataclass(frozen=True)
class CandidateTree:
    paths: tuple[tuple[int, ...], ...]  # sorted by depth, then lexicographically
    prune_below: float | None = None  # drop trailing nodes whose drafts score below this (see above)

    @classmethod
    def from_paths(
        cls, paths: list[tuple[int, ...]] | list[list[int]], prune_below: float | None = None
    ) -> CandidateTree:
        clean = sorted({tuple(int(i) for i in p) for p in paths}, key=lambda p: (len(p), p))
        if not clean or any(len(p) == 0 or min(p) < 0 for p in clean):
            raise ValueError(
                "A Medusa tree is a non-empty list of non-empty paths of non-negative top-k ranks"
            )
        known = set(clean)
        for p in clean:
            if len(p) > 1 and p[:-1] not in known:
                raise ValueError(f"Medusa tree path {list(p)} has no parent path {list(p[:-1])}")
        if prune_below is not None and not math.isfinite(prune_below):
            raise ValueError("A Medusa tree's prune_below must be a finite number")
        return cls(tuple(clean), None if prune_below is None else float(prune_below))

    @classmethod
    def load(cls, spec: str) -> CandidateTree:
        """A built-in name (see BUILTIN_TREES) or a JSON file holding a list of paths."""
        if spec in BUILTIN_TREES:
            return cls.from_paths(BUILTIN_TREES[spec])
        path = Path(spec)
        if not path.is_file():
            names = ", ".join(BUILTIN_TREES)
            raise ValueError(f"Unknown Medusa tree {spec!r}: give one of {names} or a JSON file of paths")
        return cls.from_json(json.loads(path.read_text()))

    @classmethod
    def from_json(cls, data) -> CandidateTree:
        """A list of paths, or {"paths": [...], "prune_below": x} (x may be null)."""
        if isinstance(data, dict):
            unknown = set(data) - {"paths", "prune_below"}
            if "paths" not in data or unknown:
                raise ValueError(
                    'A Medusa tree file holds a list of paths or {"paths": [...], "prune_below": x}'
                )
            prune = data.get("prune_below")
            if prune is not None and (isinstance(prune, bool) or not isinstance(prune, int | float)):
                raise ValueError("A Medusa tree's prune_below must be a number")
            return cls.from_paths(data["paths"], prune)
        if not isinstance(data, list) or not all(isinstance(p, list) for p in data):
            raise ValueError(
                "A Medusa tree is a non-empty list of non-empty paths of non-negative top-k ranks"
            )
        return cls.from_paths(data)

    def to_json(self):
        paths = [list(p) for p in self.paths]
        return paths if self.prune_below is None else {"paths": paths, "prune_below": self.prune_below}

    def check_heads(self, num_heads: int) -> None:
        if self.depth > num_heads:
            raise ValueError(
                f"The Medusa tree is {self.depth} deep but the adapter has only {num_heads} heads"
            )

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    @cached_property
    def parents(self) -> tuple[int, ...]:
        """Parent of each node as a node index, -1 for children of the root."""
        index = {p: i for i, p in enumerate(self.paths)}
        return tuple(index[p[:-1]] if len(p) > 1 else -1 for p in self.paths)

    @cached_property
    def ancestors(self) -> tuple[tuple[int, ...], ...]:
        """For each node, its ancestors' node indices from the root down, then itself."""
        out = []
        for i in range(self.size):
            chain = []
            j = i
            while j >= 0:
                chain.append(j)
                j = self.parents[j]
            out.append(tuple(reversed(chain)))
        return tuple(out)

    @cached_property
    def top_k(self) -> int:
        """How many guesses per head the tree needs."""
        return max(max(p) for p in self.paths) + 1

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """Children of the root (index 0) and of each node (index i + 1), in path order."""
        kids: list[list[int]] = [[] for _ in range(self.size + 1)]
        for i, parent in enumerate(self.parents):
            kids[parent + 1].append(i)
        return tuple(tuple(k) for k in kids)

    def node_tokens(self, guesses: list[list[int]]) -> list[int]:
        """Tokens of the nodes, from `guesses[head][rank]` (each head's top-k token ids)."""
        return [guesses[len(p) - 1][p[-1]] for p in self.paths]
