"""The tokens v2 heads draft from: the vocabulary of their training answers, not the model's whole one.

v2 heads project through the base model's lm_head, so every drafted-from row pays a pass over all its rows
(49152 x 576 on the embedded model): with a 2-deep tree over 4 verified rows, 8 such rows made the step's
lm_head call cost 2.4 ms instead of 1.3 (*script*, this CPU). Drafts are only proposals, and a token the
self-distilled answers never used twice is one the heads hardly ever guess right; so heads that carry an
n-gram table draft from the tokens that table knows, through a copy of those lm_head rows (9824 of 49152
for the shipped general adapter, 5976 for the code adapter). The n-gram node's prompt-lookup tokens come
from the request's own text, not from this vocabulary, so copying rare words from the prompt stays possible.
Verification always uses the full lm_head: outputs never depend on this.
"""

from __future__ import annotations

import numpy as np
import torch

from gorgon.kernels.linear import InvariantLinear, weight_version


class DraftVocab:
    def __init__(self, token_ids, vocab_size: int) -> None:
        ids = np.unique(np.asarray(token_ids, dtype=np.int64))
        if len(ids) == 0 or ids[0] < 0 or ids[-1] >= vocab_size:
            raise ValueError(f"draft vocabulary must be non-empty token ids below {vocab_size}")
        self.ids_array = ids  # [S] sorted token ids
        self.ids = torch.from_numpy(ids)  # the same, shared
        self.index = np.full(vocab_size, -1, dtype=np.int64)  # token id -> its column, -1 when absent
        self.index[ids] = np.arange(len(ids))
        self._projection: InvariantLinear | None = None
        self._key: tuple = ()

    @classmethod
    def from_table(cls, table, vocab_size: int) -> DraftVocab:
        return cls(table.vocabulary(), vocab_size)

    def __len__(self) -> int:
        return len(self.ids)

    def logits(self, states: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        """[..., H] head states -> [..., S] float32 logits over this vocabulary (the same values the full
        lm_head gives for these tokens; no bias: v2 heads share a bias-free lm_head)."""
        return self._projection_for(lm_head)(states).float()

    def tokens(self, columns: torch.Tensor) -> torch.Tensor:
        """Column indices -> token ids."""
        return self.ids[columns]

    def _projection_for(self, lm_head: torch.nn.Module) -> InvariantLinear:
        weight = lm_head.weight
        key = (weight.data_ptr(), weight.dtype, weight.device, weight_version(weight))
        if self._projection is None or self._key != key:  # first use, or the base weights changed
            rows = weight.detach()[self.ids.to(weight.device)]
            proj = InvariantLinear(
                rows.shape[1], rows.shape[0], bias=False, dtype=rows.dtype, device=rows.device
            )
            with torch.no_grad():
                proj.weight.copy_(rows)
            proj.requires_grad_(False)
            self._projection, self._key = proj, key
        return self._projection
