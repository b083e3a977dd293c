"""Medusa's typical acceptance (`--speculative-sampling typical`): faster and lossy.

With sampling, exact acceptance keeps a draft token only when it is the very token plain decoding would
have drawn at that position (same distribution, same random number): lossless, but a draft of a likely
token is still rejected whenever the draw lands elsewhere. The Medusa paper instead accepts any draft token
whose probability under the base model's (processed) distribution exceeds min(eps, delta * exp(-H)), H the
distribution's entropy: confident positions demand a likely token, uncertain ones accept more. The output is
no longer distributed exactly as the base model's, which is why it is an option. Greedy rows are unaffected.
"""

from __future__ import annotations

import torch

from gorgon.speculative.tree import CandidateTree

EPSILON = 0.09  # the paper's posterior threshold
DELTA = 0.3  # the paper's entropy factor (sqrt(eps) in its code)


def typical_ok(
    tree: CandidateTree,
    node_tokens: list[int],
    probs: torch.Tensor,
    epsilon: float = EPSILON,
    delta: float = DELTA,
) -> list[bool]:
    """Per tree node: is its token typical under its parent row's distribution? `probs`: [rows, V] processed
    probabilities of the chunk's rows (row 0 the root, row i + 1 node i)."""
    probs = probs.float()
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    threshold = torch.clamp(delta * torch.exp(-entropy), max=epsilon)
    ok = []
    for node, token in enumerate(node_tokens):
        row = tree.parents[node] + 1  # the root row is 0; a child of node j sits after row j + 1
        ok.append(bool(probs[row, token] > threshold[row]))
    return ok
