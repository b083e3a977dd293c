"""Acceptance of a verified candidate tree: a pure function of the tree, its tokens and the base model's
choices.

Row 0 of a verified sequence is the root (the last chosen token); row i + 1 is tree node i. `targets[r]` is
the token the base model chooses after row r, drawn exactly as plain decoding would draw it there (greedy,
or sampled from the same processed distribution with the same per-position random numbers). A node is
accepted when its token equals its parent's target, so the emitted tokens are the base model's own
choices, bitwise: speculation changes how fast they come, never what they are.
"""

from __future__ import annotations

from gorgon.speculative.tree import CandidateTree


def accept(
    tree: CandidateTree, node_tokens: list[int], targets: list[int], typical: list[bool] | None = None
) -> list[int]:
    """The longest accepted path (node indices, root excluded): every node's token equals its parent row's
    target, or, with typical acceptance (lossy, `typical[i]`), is likely enough there. Siblings hold distinct
    tokens in practice (distinct top-k ranks of one head); should two be equal, both subtrees are searched
    and the first longest path wins."""

    def longest(row: int) -> list[int]:
        best: list[int] = []
        for child in tree.children[row]:
            # A draft may fill only the first nodes of the tree (n-gram drafts can run short).
            if child >= len(node_tokens):
                continue
            if node_tokens[child] == targets[row] or (typical is not None and typical[child]):
                path = [child, *longest(child + 1)]
                if len(path) > len(best):
                    best = path
        return best

    return longest(0)


def emitted_tokens(path: list[int], targets: list[int], node_tokens: list[int] | None = None) -> list[int]:
    """Tokens a step emits: each accepted node's token, then the base model's choice after the last one.
    (With exact acceptance a node's token is its parent row's target, so `node_tokens` is not needed.)"""
    if node_tokens is None:
        return [targets[0]] + [targets[node + 1] for node in path]
    return [node_tokens[node] for node in path] + [targets[path[-1] + 1 if path else 0]]
