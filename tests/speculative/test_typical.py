"""Medusa's typical acceptance: the threshold rule, the accepted path and the emitted tokens (through the
engine: tests/engine/test_speculation.py)."""

from __future__ import annotations

import math

import torch

from gorgon.speculative.tree import CandidateTree
from gorgon.speculative.typical import DELTA, EPSILON, typical_ok
from gorgon.speculative.verify import accept, emitted_tokens


def test_threshold_is_min_of_epsilon_and_entropy_term():
    tree = CandidateTree.from_paths([(0,), (1,), (0, 0)])
    probs = torch.zeros(4, 5)
    probs[0] = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])  # root row: moderate entropy
    probs[1] = torch.tensor([0.97, 0.01, 0.01, 0.005, 0.005])  # after node 0: confident
    entropy = lambda p: -sum(x * math.log(x) for x in p.tolist() if x > 0)
    t0 = min(EPSILON, DELTA * math.exp(-entropy(probs[0])))
    t1 = min(EPSILON, DELTA * math.exp(-entropy(probs[1])))
    ok = typical_ok(tree, [1, 3, 1], probs)
    assert ok == [0.3 > t0, 0.05 > t0, 0.01 > t1]
    assert ok == [True, False, False]


def test_accept_and_emit_with_typical_flags():
    tree = CandidateTree.from_paths([(0,), (1,), (0, 0), (1, 0)])
    nodes = [10, 11, 12, 13]
    targets = [99, 98, 97, 96, 95]  # plain decoding drew none of the drafts
    assert accept(tree, nodes, targets) == []
    path = accept(tree, nodes, targets, typical=[False, True, True, True])
    assert path == [1, 3]  # node 1 (typical) then its child node 3
    assert emitted_tokens(path, targets, nodes) == [11, 13, targets[4]]
    assert emitted_tokens([], targets, nodes) == [99]
    # exact acceptance emits the same with or without node tokens
    exact = accept(tree, [99, 5, 97, 6], targets)
    assert emitted_tokens(exact, targets) == emitted_tokens(exact, targets, [99, 5, 97, 6])
