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


def accept(tree: CandidateTree, node_tokens: list[int], targets: list[int]) -> list[int]:
    """The accepted path (node indices, root excluded), greedily longest: at each row, the child whose token
    equals the row's target (children are tried in path order; tokens of siblings are distinct in practice,
    and when they are not, the first wins, which changes nothing that is emitted)."""
    path: list[int] = []
    row = 0
    while True:
        target = targets[row]
        # A draft may fill only the first nodes of the tree (n-gram drafts can run short).
        child = next(
            (c for c in tree.children[row] if c < len(node_tokens) and node_tokens[c] == target), None
        )
        if child is None:
            return path
        path.append(child)
        row = child + 1


def emitted_tokens(path: list[int], targets: list[int]) -> list[int]:
    """Tokens a step emits: each accepted node's token, then the base model's choice after the last one."""
    return [targets[0]] + [targets[node + 1] for node in path]
