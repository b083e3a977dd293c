"""Choose the next token of every row in a step.

Two properties drive the design:

* Batch invariance: a row's token, logprob and alternatives are bitwise the same whether it is sampled alone
  or among other rows. Processors run per row (`logits_process.process_row` on a `(1, V)` view); the only
  batched ops (`argmax`, `log_softmax`, `gather`) reduce along the vocabulary, one row at a time.
* Randomness keyed by `(seed, step)`, not drawn from a stream: the uniform for a row comes from a generator
  seeded with a hash of the request's seed and the token index, so a token does not depend on what else was
  sampled before or beside it, and the same seed gives the same text. The token is picked by inverse CDF over
  the processed probabilities, which needs one uniform per token; `uniforms` is public so that speculative
  rejection sampling draws from the same keyed source.

The common case (all rows greedy, no alternatives) is one call of a CPU kernel that picks each row's first
maximum and its log-softmax value (elsewhere: one batched argmax plus a log_softmax gather), with no
per-row tensor ops and no host sync. Only `alternatives` needs a device-to-host copy (one per
call, and only when a row asks for them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gorgon.engine.logits_process import needs_processing, process_row
from gorgon.engine.request import SamplingParams
from gorgon.kernels.build import cpu_extension

_MASK64 = (1 << 64) - 1


@dataclass
class RowSampling:
    """What the sampler needs to know about one row of the step's logits."""

    params: SamplingParams
    seed: int  # the request's resolved seed
    step: int  # index of the token being generated (0 for the first new token)
    history: torch.Tensor | None = None  # LongTensor of prompt + generated ids so far; needed for penalties
    top_n: int = 0  # number of alternatives to report


@dataclass
class SampleResult:
    token_ids: torch.Tensor  # (N,) long, on the logits' device
    logprobs: torch.Tensor  # (N,) float32: logprob of the chosen token under the processed distribution
    alternatives: list[list[tuple[int, float]]]  # per row, up to top_n (id, logprob), most probable first


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _generator_seed(seed: int, step: int) -> int:
    """Mix `(seed, step)` into the 32 bits that torch's CPU Mersenne Twister actually uses."""
    h = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def uniforms(seed: int, step: int, n: int) -> torch.Tensor:
    """`n` uniforms in [0, 1) for token `step` of the request seeded `seed`: a float64 CPU tensor.

    A pure function of its arguments; `uniforms(s, t, n)[:m] == uniforms(s, t, m)`. The sampler uses
    element 0 to pick the token; a rejection sampler may use further elements of the same step.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_generator_seed(seed, step))
    return torch.rand(n, generator=gen, dtype=torch.float64)


def process_logits(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Apply each row's penalties and (for sampled rows) warpers. `logits`: (N, V) float.

    Returns `logits` itself when no row needs processing, else a new tensor; the input is never modified.
    """
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(
            f"logits must be (N, V) with one row per RowSampling; got {tuple(logits.shape)} "
            f"for {len(rows)} rows"
        )
    out = None
    for i, row in enumerate(rows):
        if not needs_processing(row.params):
            continue
        if out is None:
            out = logits.clone()
        out[i : i + 1] = process_row(logits[i : i + 1], row.params, row.history)
    return logits if out is None else out


def processed_probs(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """The distribution each row's token is drawn from (greedy rows: softmax of the penalised logits): (N, V)."""
    return torch.softmax(process_logits(logits, rows), dim=-1)


def _cdf_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps the cumulative sum exact enough over a 100k+ vocabulary; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _inverse_cdf(logprobs: torch.Tensor, u: float) -> torch.Tensor:
    """Token drawn from one row's distribution `exp(logprobs)` (V,) with the uniform `u` in [0, 1): (1,) long.

    Searches for the first index whose cumulative mass reaches `(1 - u) * total`. That target lies in
    (0, total], so the search always lands inside the vocabulary and never on a zero-probability token
    (a removed token does not raise the cumulative mass, so an earlier index reaches the target first).
    """
    cdf = logprobs.to(_cdf_dtype(logprobs.device)).exp().cumsum(dim=0)
    target = (cdf[-1:] * (1.0 - u)).contiguous()  # python-float scale: no host-device transfer
    return torch.searchsorted(cdf, target, side="left").clamp_(max=cdf.shape[0] - 1)  # clamp: NaN rows


def _alternatives(logprobs: torch.Tensor, rows: list[RowSampling]) -> list[list[tuple[int, float]]]:
    """Top-n (id, logprob) per row; tokens the warpers removed (logprob -inf) are not reported."""
    out: list[list[tuple[int, float]]] = [[] for _ in rows]
    wanted = [i for i, row in enumerate(rows) if row.top_n > 0]
    if not wanted:
        return out
    vocab = logprobs.shape[-1]
    vals, ids = [], []
    for i in wanted:  # per row: topk over a single row cannot depend on the batch
        top = torch.topk(logprobs[i], min(rows[i].top_n, vocab))
        vals.append(top.values)
        ids.append(top.indices)
    all_vals = torch.cat(vals).tolist()  # the step's one host sync (the ids copy then finds it done)
    all_ids = torch.cat(ids).tolist()
    pos = 0
    for i, v in zip(wanted, vals, strict=True):
        k = v.shape[0]
        out[i] = [
            (t, lp)
            for t, lp in zip(all_ids[pos : pos + k], all_vals[pos : pos + k], strict=True)
            if lp != float("-inf")
        ]
        pos += k
    return out


def kernel_rows(rows: list[RowSampling], logits: torch.Tensor) -> list[int]:
    """The rows whose token and logprob come from the CPU greedy kernel (greedy rows without alternatives,
    when the logits are float32 on the CPU): one vectorised pass instead of torch's argmax, log_softmax and
    gather. Its logprob rounds in its own order, a few ulps from log_softmax's."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or cpu_extension() is None:
        return []
    return [i for i, row in enumerate(rows) if row.params.greedy and not row.top_n]


def sample(logits: torch.Tensor, rows: list[RowSampling]) -> SampleResult:
    """Pick one token per row. `logits`: (N, V) float32 on any device.

    Greedy rows take the argmax of the penalised logits (ties: lowest id); sampled rows draw from the
    processed distribution with `uniforms(seed, step, 1)`. Logprobs and alternatives are under the same
    processed distribution the token came from.
    """
    processed = process_logits(logits, rows)
    # Greedy rows without alternatives go through the kernel whatever else is in the step (its logprob
    # rounds differently from log_softmax's: a row must not get other bits in another batch).
    picked = kernel_rows(rows, processed)
    if picked and len(picked) == len(rows):
        token_ids, logprobs = cpu_extension().greedy_pick(processed)
        return SampleResult(token_ids=token_ids, logprobs=logprobs, alternatives=[[] for _ in rows])
    logprobs_all = torch.log_softmax(processed, dim=-1)  # (N, V), per-row reduction
    token_ids = torch.argmax(processed, dim=-1)  # (N,); argmax returns the first maximum
    for i, row in enumerate(rows):
        if row.params.greedy:
            continue
        u = float(uniforms(row.seed, row.step, 1)[0])
        token_ids[i : i + 1] = _inverse_cdf(logprobs_all[i], u)
    logprobs = logprobs_all.gather(-1, token_ids[:, None]).squeeze(-1)
    if picked:
        index = torch.tensor(picked, device=processed.device)
        token_ids[index], logprobs[index] = cpu_extension().greedy_pick(processed[index])
    return SampleResult(
        token_ids=token_ids, logprobs=logprobs, alternatives=_alternatives(logprobs_all, rows)
    )
