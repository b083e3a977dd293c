"""The tokens v2 heads draft from: the vocabulary of their training answers, not the model's whole one.

v2 heads project through the base model's lm_head, so every drafted-from row pays a pass over all its rows
(49152 x 576 on the embedded model): with a 2-deep tree over 4 verified rows, 8 such rows made the step's
lm_head call cost 2.4 ms instead of 1.3 (*script*, this CPU). Drafts are only proposals, and a token the
self-distilled answers never used twice is one the heads hardly ever guess right; so heads that carry an
n-gram table draft from the tokens that table knows (13480 of 49152 for the shipped general adapter, 5976
for the code adapter). On the kernel path their logits come from the step's lm_head pass itself
(`joint_logits`: a copy of the lm_head packed with these rows first); elsewhere from a copy of those rows.
The n-gram node's prompt-lookup tokens come from the request's own text, not from this vocabulary, so
copying rare words from the prompt stays possible. Verification always uses the full lm_head: outputs
never depend on this.
"""

from __future__ import annotations

import numpy as np
import torch

from gorgon.kernels.build import cpu_extension as _extension
from gorgon.kernels.linear import InvariantLinear, kernel_available, weight_version


class DraftVocab:
    # Whether the runner takes these logits from the lm_head's pass (`joint_logits`). That keeps a packed copy
    # of the whole lm_head (57 MB on the embedded model, far more on large vocabularies), so only the
    # server's default heads do; per-request heads use their rows' copy.
    joint_pass = False

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
        self._joint: tuple[torch.Tensor, torch.Tensor] | None = None  # see joint_logits
        self._joint_key: tuple = ()

    @classmethod
    def from_table(cls, table, vocab_size: int) -> DraftVocab:
        return cls(table.vocabulary(), vocab_size)

    def __len__(self) -> int:
        return len(self.ids)

    def logits(self, states: torch.Tensor, lm_head: torch.nn.Module) -> torch.Tensor:
        """[..., H] head states -> [..., S] float32 logits over this vocabulary (the same values the full
        lm_head gives for these tokens; no bias: v2 heads share a bias-free lm_head)."""
        return self._projection_for(lm_head)(states).float()

    def joint_logits(
        self, rows: torch.Tensor, states: torch.Tensor, lm_head: torch.nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(lm_head's float32 logits of `rows` [m, V], this vocabulary's of `states` [d, S]): bitwise what
        `lm_head(rows)` and `logits(states)` give, but with the CPU kernel in one pass over the weights: a
        copy of the lm_head packed with this vocabulary's rows first lets the head states stop after
        those. The separate projection re-read 15.5 MB of weights each drafted step (0.2 ms of ~18 on the
        embedded model, *script*)."""
        joint = self._joint_for(lm_head)
        if joint is None:
            return lm_head(rows).float(), self.logits(states, lm_head)
        packed, col_of = joint
        full, draft = _extension().invariant_linear_joint(
            torch.cat([rows, states]), packed, lm_head.weight.shape[0], rows.shape[0], len(self), col_of
        )
        return full.float(), draft.float()

    def _joint_for(self, lm_head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(packed lm_head weight, this vocabulary's rows first; packed column -> token id), or None where
        the kernel does not run this lm_head."""
        weight = lm_head.weight
        usable = (
            isinstance(lm_head, InvariantLinear)
            and lm_head.use_kernel
            and lm_head.bias is None
            and kernel_available(weight.dtype, weight.device)
        )
        if not usable:
            return None
        key = _weight_key(weight)
        if self._joint is None or self._joint_key != key:  # first use, or the base weights changed
            rest = np.setdiff1d(np.arange(weight.shape[0]), self.ids_array)
            col_of = torch.from_numpy(np.concatenate([self.ids_array, rest])).to(weight.device)
            self._joint = (_extension().pack_weight(weight.detach()[col_of].contiguous()), col_of)
            self._joint_key = key
        return self._joint

    def tokens(self, columns: torch.Tensor) -> torch.Tensor:
        """Column indices -> token ids."""
        return self.ids[columns]

    def _projection_for(self, lm_head: torch.nn.Module) -> InvariantLinear:
        weight = lm_head.weight
        key = _weight_key(weight)
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


def _weight_key(weight: torch.Tensor) -> tuple:
    """What identifies the lm_head weights a copy was made from: a new tensor, or this one changed in place,
    makes the copies here stale."""
    return weight.data_ptr(), weight.dtype, weight.device, weight_version(weight)
