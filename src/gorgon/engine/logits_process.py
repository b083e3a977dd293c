"""Logits processors: penalties and sampling warpers, as pure functions on float logits.

Every function works along the last dim of a `(..., V)` tensor and returns a new tensor; the sampler calls them
on one row at a time (shape `(1, V)`), which is what makes a row's result independent of the batch around it.
Removed tokens get `-inf`; every warper keeps at least one token.

Semantics follow HF transformers' processors (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper, with `min_tokens_to_keep=1`) and, for the
frequency/presence penalties that transformers lacks, TGI/LoRAX: both count tokens over the whole history,
prompt included (see `apply_frequency_presence_penalty`). Scalars stay Python floats so that the arithmetic
(e.g. division by a scalar, which PyTorch turns into multiplication by its reciprocal) is the same as
transformers' and no host-to-device copy is needed.
"""

from __future__ import annotations

import torch

from gorgon.engine.request import SamplingParams

_NEG_INF = float("-inf")


def token_counts(history: torch.Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """How often each token id occurs in `history`: `(V,)`.

    Ids at or past `vocab_size` (an embedding larger than the LM head) are dropped, as transformers does:
    such tokens cannot be generated, so there is nothing to penalise. Uses `scatter_add_` rather than
    `bincount`, which would sync with the host on CUDA; adding ones is exact, so atomics do not matter.
    """
    ids = history.reshape(-1).clamp(min=0, max=vocab_size)  # out-of-vocab ids land in the spare slot
    counts = torch.zeros(vocab_size + 1, dtype=dtype, device=history.device)
    counts.scatter_add_(0, ids, torch.ones(ids.shape, dtype=dtype, device=history.device))
    return counts[:vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens seen in the history (once per token, however often it occurred):
    positive logits are divided by `penalty`, negative ones multiplied. `seen` is a bool mask `(V,)`."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence_penalty(
    logits: torch.Tensor, counts: torch.Tensor, history_len: int, frequency: float, presence: float
) -> torch.Tensor:
    """TGI/LoRAX frequency and presence penalties over the whole history (prompt + generated).

    `logits - frequency * count / history_len - presence * (count > 0)`. Unlike OpenAI's definition the
    frequency term is normalised by the history length (as LoRAX does), so it stays bounded on long prompts.
    LoRAX divides by the padded batch length; Gorgon uses the row's own length, so a row does not depend on
    its batch.
    """
    out = logits
    if frequency != 0.0 and history_len > 0:
        out = out - (counts / history_len) * frequency
    if presence != 0.0:
        out = out - (counts > 0).to(logits.dtype) * presence
    return out


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` highest logits (and any tied with the k-th), like transformers' TopKLogitsWarper."""
    k = min(max(top_k, 1), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, _NEG_INF)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the most probable tokens whose mass reaches `top_p` (TopPLogitsWarper).

    Sorting ascending and removing the prefix whose cumulative mass is `<= 1 - top_p` keeps the smallest
    set of top tokens that reaches `top_p`; the most probable token always survives. The sort is stable so
    that ties are broken by token id on every device.
    """
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False, stable=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, _NEG_INF)


def typical_filter(logits: torch.Tensor, typical_p: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022), like transformers' TypicalLogitsWarper: rank tokens
    by how close their surprisal is to the entropy and keep the closest until `typical_p` mass is reached."""
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)  # nansum: -inf * 0 for removed tokens
    shifted = (-logp - entropy).abs()
    sorted_shifted, sorted_idx = torch.sort(shifted, dim=-1, descending=False, stable=True)
    cum = logits.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
    # Index of the last token needed to reach the mass; everything ranked strictly after it goes.
    last = (cum < typical_p).sum(dim=-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)
    remove_sorted = sorted_shifted > sorted_shifted.gather(-1, last)
    remove_sorted[..., :1] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, _NEG_INF)


def _bounded_scale(value: float, dtype: torch.dtype) -> float:
    """A temperature or repetition penalty clamped into `[tiny, 1 / tiny]` of `dtype`.

    Validation only asks for > 0, but a scale that rounds to 0 or inf in `dtype` (1e-46, 1e39 in float32) turns
    `0 / t`, `-inf * p` or `-inf / t` into NaN. Inside these bounds the scalar and its reciprocal (PyTorch may
    multiply by it) are normal numbers, so the products are finite or +-inf, never NaN; the bounds leave every
    sensible value untouched (transformers parity) and change nothing a float32 softmax could tell apart.
    """
    tiny = torch.finfo(dtype).tiny
    return min(max(value, tiny), 1.0 / tiny)


def _saturate(out: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Finite logits that the penalties or the temperature pushed past the float range (logit 1e30, penalty
    1e-3, temperature 1e-6) saturate at +-max instead of +-inf: one +inf makes the softmax NaN for the whole
    row, and a row where every token went to -inf has no distribution at all; the sampler then drew a token
    from NaNs, possibly a masked one. Saturated tokens tie (the dtype can no longer order them). Tokens
    that were -inf on input (masked) stay -inf; NaN (only from NaN inputs or parameters) means removed.
    Elementwise, and the identity on rows that did not overflow (bitwise: transformers parity holds)."""
    big = torch.finfo(out.dtype).max
    return torch.where(logits == _NEG_INF, logits, out.nan_to_num(nan=_NEG_INF, posinf=big, neginf=-big))


def needs_processing(params: SamplingParams) -> bool:
    """Whether `process_row` would change the logits at all (the sampler skips rows where it would not)."""
    if params.needs_history:
        return True
    if params.greedy:
        return False
    return params.temperature != 1.0 or params.top_k > 0 or params.top_p < 1.0 or params.typical_p < 1.0


def process_row(logits: torch.Tensor, params: SamplingParams, history: torch.Tensor | None) -> torch.Tensor:
    """All processors for one row `(1, V)`: penalties, then (sampled rows only) temperature, top-k, top-p,
    typical-p, in transformers' order. Greedy rows get the penalties only: argmax ignores the warpers."""
    out = logits
    if params.needs_history:
        if history is None:
            raise ValueError("penalties need the row's token history; pass RowSampling.history")
        vocab = logits.shape[-1]
        counts = token_counts(history.to(logits.device), vocab, logits.dtype)
        if params.repetition_penalty != 1.0:
            penalty = _bounded_scale(params.repetition_penalty, logits.dtype)
            out = apply_repetition_penalty(out, counts > 0, penalty)
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            out = apply_frequency_presence_penalty(
                out, counts, history.numel(), params.frequency_penalty, params.presence_penalty
            )
    if not params.greedy and params.temperature != 1.0:
        out = apply_temperature(out, _bounded_scale(params.temperature, logits.dtype))
    if out is not logits:  # the scaling steps are the only ones that can overflow (see `_saturate`)
        out = _saturate(out, logits)
    if params.greedy:
        return out
    if params.top_k > 0:
        out = top_k_filter(out, params.top_k)
    if params.top_p < 1.0:
        out = top_p_filter(out, params.top_p)
    if params.typical_p < 1.0:
        out = typical_filter(out, params.typical_p)
    return out
