"""Property-based tests of the sampler and the logits processors (`gorgon.engine.sampler.sample`,
`gorgon.engine.logits_process`), over random logits (finite, some masked to -inf, vocab 2..300), every
sampling parameter, seeds and token histories.

Properties: the token is a valid id that the processing did not remove; a row's result depends only on
its own logits, parameters, seed and step (not on the rows beside it, nor on earlier calls); greedy rows take
the argmax of the penalised logits; the processors never make NaN from finite input and only ever remove
tokens; extreme values (temperature 1e-6 / 1e6, penalties 1e-3 / 1e3, logits +-1e30 and beyond) still give a
valid token; and seeded draws follow softmax(logits / T) (chi-square, fixed seeds: deterministic).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from gorgon.engine import logits_process as lp
from gorgon.engine.request import SamplingParams
from gorgon.engine.sampler import RowSampling, kernel_rows, process_logits, sample, uniforms

NEG_INF = float("-inf")
F32_MAX = torch.finfo(torch.float32).max
EXAMPLES = settings(max_examples=200, deadline=None)
MASK64 = 2**64 - 1

# --- strategies ---------------------------------------------------------------------------------------------


@st.composite
def logits_rows(draw, vocab: int | None = None, magnitude: float = 1e30, masked: bool = True) -> torch.Tensor:
    """One row of float32 logits `(V,)`: explicit values, scaled normals, many ties, or one dominant token;
    optionally with some tokens masked to -inf (never all)."""
    v = vocab if vocab is not None else draw(st.integers(2, 300))
    kind = draw(st.sampled_from(["values", "normal", "ties", "peaked"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if kind == "values":
        bound = float(torch.tensor(magnitude, dtype=torch.float32))  # as a float32
        finite = st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)
        row = torch.tensor(draw(st.lists(finite, min_size=v, max_size=v)), dtype=torch.float32)
    elif kind == "ties":
        row = torch.randint(-2, 3, (v,), generator=gen).float() * draw(st.sampled_from([1.0, 1e-3, 1e4]))
    else:
        scale = draw(st.sampled_from([1e-3, 1.0, 3.0, 30.0, 1e4, magnitude]))
        row = (
            (torch.randn(v, generator=gen, dtype=torch.float64) * scale).clamp(-magnitude, magnitude).float()
        )
        if kind == "peaked":
            row[draw(st.integers(0, v - 1))] = draw(st.sampled_from([20.0, 100.0, magnitude]))
    if masked and draw(st.booleans()):
        frac = draw(st.sampled_from([0.1, 0.5, 0.9, 1.0]))
        mask = torch.rand(v, generator=gen) < frac
        mask[draw(st.integers(0, v - 1))] = False  # at least one token left
        row[mask] = NEG_INF
    return row


def _maybe(default, values: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.just(default), values)


@st.composite
def sampling_params(draw, extreme: bool = False) -> SamplingParams:
    """Parameters in the ranges validation lets through; `extreme`: their far ends as well."""
    temperatures = st.floats(0.05, 5.0)
    penalties = st.floats(0.1, 10.0)
    if extreme:
        temperatures = st.one_of(temperatures, st.sampled_from([1e-6, 1e6, 1e-30, 1e-46, 5e-324, 1e300]))
        penalties = st.one_of(penalties, st.sampled_from([1e-3, 1e3, 1e-40, 1e40, 1e-300, 1e300]))
    return SamplingParams(
        do_sample=draw(st.booleans()),
        temperature=draw(st.one_of(st.just(1.0), st.just(0.0), temperatures)),
        top_k=draw(_maybe(0, st.one_of(st.integers(1, 400), st.just(1)))),
        top_p=draw(
            _maybe(1.0, st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.sampled_from([1e-9, 0.999999])))
        ),
        typical_p=draw(_maybe(1.0, st.floats(0.0, 1.0, exclude_min=True, exclude_max=True))),
        repetition_penalty=draw(_maybe(1.0, penalties)),
        frequency_penalty=draw(_maybe(0.0, st.floats(-2.0, 2.0))),
        presence_penalty=draw(_maybe(0.0, st.floats(-2.0, 2.0))),
        seed=None,
    )


@st.composite
def rows(draw, vocab: int | None = None, magnitude: float = 1e30, extreme: bool = False, masked: bool = True):
    """(logits `(V,)`, RowSampling): a row with its parameters, seed, step, history and alternatives."""
    logits = draw(logits_rows(vocab, magnitude, masked))
    v = logits.shape[0]
    history = torch.tensor(
        draw(st.lists(st.integers(0, v + 4), max_size=60)), dtype=torch.long
    )  # ids >= V: dropped
    row = RowSampling(
        params=draw(sampling_params(extreme)),
        seed=draw(st.one_of(st.integers(0, MASK64), st.integers(-(2**63), -1))),
        step=draw(st.integers(0, 10**6)),
        history=history,
        top_n=draw(st.integers(0, 12)),
    )
    return logits, row


@st.composite
def batches(draw, max_others: int = 3):
    """A target row, up to `max_others` random rows of the same vocabulary, and where the target goes."""
    vocab = draw(st.integers(2, 300))
    target = draw(rows(vocab))
    others = draw(st.lists(rows(vocab), max_size=max_others))
    return target, others, draw(st.integers(0, len(others)))


# --- helpers ------------------------------------------------------------------------------------------------


def _pre(logits: torch.Tensor, row: RowSampling, **off) -> torch.Tensor:
    """The row processed with some warpers switched off: what the next warper saw."""
    params = dataclasses.replace(row.params, **off)
    return process_logits(logits[None], [dataclasses.replace(row, params=params)])[0]


def _penalised_reference(logits: torch.Tensor, row: RowSampling) -> torch.Tensor:
    """Penalties recomputed from their definitions (repetition: CTRL; frequency / presence: LoRAX)."""
    p, out = row.params, logits.clone()
    v = logits.shape[0]
    hist = row.history[row.history < v]
    counts = torch.bincount(hist, minlength=v).to(torch.float32)
    if p.repetition_penalty != 1.0:
        seen = counts > 0
        out = torch.where(
            seen, torch.where(out < 0, out * p.repetition_penalty, out / p.repetition_penalty), out
        )
    if p.frequency_penalty != 0.0 and row.history.numel() > 0:
        out = out - (counts / row.history.numel()) * p.frequency_penalty
    if p.presence_penalty != 0.0:
        out = out - (counts > 0).to(out.dtype) * p.presence_penalty
    return out


def _same_logprob(got: torch.Tensor, expected: torch.Tensor, row: RowSampling, logits: torch.Tensor) -> bool:
    """log_softmax's value; a row the CPU greedy kernel picks gets it rounded in the kernel's own order (a
    few ulps)."""
    if kernel_rows([row], logits[None]):
        return bool(torch.isclose(got, expected, rtol=1e-5, atol=1e-5))
    return bool(got == expected)


def _check_result(logits: torch.Tensor, row: RowSampling, res, i: int = 0) -> int:
    """The invariants of one row's result; returns its token."""
    v = logits.shape[0]
    tok = int(res.token_ids[i])
    assert 0 <= tok < v
    assert logits[tok] > NEG_INF, "sampled a token masked in the input"
    processed = process_logits(logits[None], [row])[0]
    assert not torch.isnan(processed).any(), processed
    logprobs = torch.log_softmax(processed, -1)
    assert not torch.isnan(logprobs).any()
    assert processed[tok] > NEG_INF and logprobs[tok] > NEG_INF, "sampled a token the processing removed"
    assert math.isfinite(float(res.logprobs[i])) and _same_logprob(
        res.logprobs[i], logprobs[tok], row, logits
    )
    # Masked tokens stay masked, whatever the processing did.
    assert (processed[logits == NEG_INF] == NEG_INF).all()
    # Alternatives: the top-n of the processed distribution, removed tokens left out.
    alts = res.alternatives[i]
    alive = int((logprobs > NEG_INF).sum())
    assert len(alts) == min(row.top_n, alive)
    assert [lp_ for _, lp_ in alts] == sorted((lp_ for _, lp_ in alts), reverse=True)
    assert all(0 <= t < v and logprobs[t].item() == a and a > NEG_INF for t, a in alts)
    if alts:
        assert alts[0][1] == logprobs.max().item()
    return tok


# --- properties ---------------------------------------------------------------------------------------------


@EXAMPLES
@given(case=rows(magnitude=F32_MAX))
def test_token_is_valid_and_never_a_removed_one(case):
    logits, row = case
    res = sample(logits[None], [row])
    tok = _check_result(logits, row, res)
    p = row.params
    if p.greedy:
        return
    # Each warper, checked against its definition on what it was given (the earlier stages' output).
    if p.top_k > 0:
        pre = _pre(logits, row, top_k=0, top_p=1.0, typical_p=1.0)
        kth = torch.topk(pre, min(p.top_k, pre.shape[0])).values[-1]
        assert pre[tok] >= kth, "outside the top-k"
    if p.top_p < 1.0:
        pre = _pre(logits, row, top_p=1.0, typical_p=1.0)
        probs = torch.softmax(pre.double(), -1)
        above = probs[probs > probs[tok]].sum().item()
        assert above < p.top_p + 1e-4, ("outside the nucleus", above, p.top_p)


@EXAMPLES
@given(case=batches())
def test_row_is_independent_of_its_batch_and_of_earlier_calls(case):
    (logits, row), others, pos = case
    alone = sample(logits[None], [row])
    again = sample(logits[None].clone(), [row])
    all_rows = [r for _, r in others]
    all_logits = [lg for lg, _ in others]
    all_rows.insert(pos, row)
    all_logits.insert(pos, logits)
    batch = sample(torch.stack(all_logits), all_rows)
    for res, i in ((again, 0), (batch, pos)):
        assert torch.equal(res.token_ids[i], alone.token_ids[0])
        assert torch.equal(res.logprobs[i], alone.logprobs[0])
        assert res.alternatives[i] == alone.alternatives[0]
    # And the batch's own rows each satisfy the invariants.
    for i, (lg, r) in enumerate(zip(all_logits, all_rows, strict=True)):
        _check_result(lg, r, batch, i)


@EXAMPLES
@given(
    seed=st.one_of(st.integers(0, MASK64), st.integers(-(2**63), -1)),
    step=st.integers(0, 2**40),
    n=st.integers(1, 8),
)
def test_uniforms_are_a_pure_function_of_seed_and_step(seed, step, n):
    u = uniforms(seed, step, n)
    assert u.dtype == torch.float64 and u.shape == (n,)
    assert ((u >= 0) & (u < 1)).all()
    assert torch.equal(u, uniforms(seed, step, n)) and torch.equal(uniforms(seed, step, 1), u[:1])
    assert torch.equal(uniforms(seed & MASK64, step, n), u)  # the seed is taken modulo 2**64


@EXAMPLES
@given(case=rows(magnitude=1e30), data=st.data())
def test_greedy_is_the_argmax_of_the_penalised_logits(case, data):
    logits, row = case
    # Greedy either way: do_sample false (warpers set or not), or temperature 0.
    greedy = data.draw(
        st.sampled_from(
            [
                dataclasses.replace(row.params, do_sample=False),
                dataclasses.replace(row.params, do_sample=True, temperature=0.0),
            ]
        )
    )
    row = dataclasses.replace(row, params=greedy)
    res = sample(logits[None], [row])
    tok = _check_result(logits, row, res)
    processed = process_logits(logits[None], [row])[0]
    assert tok == int(torch.argmax(processed))
    # The warpers play no part in greedy decoding.
    plain = dataclasses.replace(greedy, temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0)
    assert torch.equal(processed, process_logits(logits[None], [dataclasses.replace(row, params=plain)])[0])
    # Against the penalties' definitions (no overflow in these ranges): the first maximum.
    reference = _penalised_reference(logits, row)
    assert tok == int(torch.argmax(reference))
    if not greedy.needs_history:
        assert tok == int(torch.argmax(logits))
        assert _same_logprob(res.logprobs[0], torch.log_softmax(logits, -1)[tok], row, logits)


_SCALING = st.floats(0.05, 20.0)


@EXAMPLES
@given(
    logits=logits_rows(magnitude=F32_MAX),
    temperature=_SCALING,
    top_k=st.integers(1, 400),
    top_p=st.floats(0.0, 1.0, exclude_min=True),
    typical_p=st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
)
def test_each_warper_only_removes_tokens_and_keeps_its_promise(logits, temperature, top_k, top_p, typical_p):
    """On (1, V) rows with masked tokens: no NaN, values kept or set to -inf, at least one token left, and
    each warper's own guarantee."""
    x = lp.apply_temperature(logits[None], temperature)[0]
    x = torch.where(logits == NEG_INF, logits, x.clamp(-F32_MAX, F32_MAX))  # the sampler saturates overflow
    assert not torch.isnan(x).any()
    alive = x > NEG_INF
    n_alive = int(alive.sum())
    for name, out in (
        ("top_k", lp.top_k_filter(x[None], top_k)[0]),
        ("top_p", lp.top_p_filter(x[None], top_p)[0]),
        ("typical", lp.typical_filter(x[None], typical_p)[0]),
    ):
        note(name)
        assert not torch.isnan(out).any()
        kept = out > NEG_INF
        assert kept.any() and not (kept & ~alive).any()
        assert torch.equal(out[kept], x[kept])
        probs = torch.softmax(x.double(), -1)
        if name == "top_k":
            assert int(kept.sum()) >= min(top_k, n_alive)
            if (alive & ~kept).any():
                assert x[kept].min() >= x[alive & ~kept].max()  # the k highest (and ties)
                assert int(kept.sum()) == int((x >= x[kept].min()).sum())
        elif name == "top_p":
            assert probs[kept].sum().item() >= min(top_p, 1.0) - 1e-4
            if (alive & ~kept).any():
                assert probs[kept].min() >= probs[alive & ~kept].max()  # the most probable ones
        else:
            assert probs[kept].sum().item() >= min(typical_p, 1.0) - 1e-4


@EXAMPLES
@given(case=rows(magnitude=1e30, masked=True))
def test_processing_finite_logits_gives_no_nan(case):
    logits, row = case
    logits = torch.where(logits == NEG_INF, torch.zeros(()), logits)  # all finite this time
    out = process_logits(logits[None], [row])[0]
    assert not torch.isnan(out).any() and (out > NEG_INF).any()
    if row.params.greedy:
        assert torch.isfinite(out).all()  # penalties alone remove nothing (overflow saturates)


_EXTREME_VALUES = [1e30, -1e30, 3e38, -3e38, F32_MAX, -F32_MAX, 0.0, -0.0, 1e-45, -1e-45, 1.0, -1.0]


@st.composite
def extreme_rows(draw):
    vocab = draw(st.integers(2, 40))
    values = draw(st.lists(st.sampled_from(_EXTREME_VALUES), min_size=vocab, max_size=vocab))
    logits = torch.tensor(values, dtype=torch.float32)
    if draw(st.booleans()):
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=vocab, max_size=vocab)))
        mask[draw(st.integers(0, vocab - 1))] = False
        logits[mask] = NEG_INF
    # Histories that cover much of the (small) vocabulary: every seen token gets the penalty.
    history = torch.tensor(draw(st.lists(st.integers(0, vocab - 1), max_size=3 * vocab)), dtype=torch.long)
    params = draw(sampling_params(extreme=True))
    return logits, RowSampling(params, seed=draw(st.integers(0, MASK64)), step=0, history=history, top_n=3)


@EXAMPLES
@given(case=extreme_rows())
def test_extreme_values_still_give_a_valid_token(case):
    """Temperature 1e-6 on logits 1e30 with a repetition penalty of 1e-3 overflows float32: the row must still
    have a distribution (no NaN) and the token must be one that was not masked."""
    logits, row = case
    res = sample(logits[None], [row])
    _check_result(logits, row, res)


@pytest.mark.parametrize(
    "logits, params, history, expected",
    [
        # +inf after penalty and temperature: the overflowing tokens share the mass; the masked one gets none.
        ([1e30, 1e30, NEG_INF], SamplingParams(True, 1e-6, repetition_penalty=1e-3), [0, 1], {0, 1}),
        # Every live token seen and pushed to -inf: still a distribution over them.
        ([-1e30, -1e30, NEG_INF], SamplingParams(True, 1e-6, repetition_penalty=1e3), [0, 1], {0, 1}),
        # A temperature that is 0 in float32 (0 / 0 was NaN): the argmax.
        ([0.0, -1.0, NEG_INF], SamplingParams(True, 1e-46), [], {0}),
        # An infinite-in-float32 temperature (-inf / inf was NaN): uniform over the live tokens.
        ([0.0, -1.0, NEG_INF], SamplingParams(True, 1e39), [], {0, 1}),
        # A logit near the float32 maximum divided by 0.5.
        ([3e38, -1.0, 3.0], SamplingParams(True, 0.5), [], {0}),
        # A greedy row whose penalty is 0 in float32 (0 / 0 was NaN, and argmax picks NaN).
        ([0.0, 2.0, -1.0], SamplingParams(repetition_penalty=1e-46), [0], {1}),
    ],
)
def test_overflow_regressions(logits, params, history, expected):
    logits = torch.tensor(logits, dtype=torch.float32)
    seen = set()
    for seed in range(64):
        row = RowSampling(params, seed=seed, step=0, history=torch.tensor(history, dtype=torch.long), top_n=2)
        res = sample(logits[None], [row])
        _check_result(logits, row, res)
        seen.add(int(res.token_ids[0]))
    assert seen == expected


# --- statistics ---------------------------------------------------------------------------------------------

DRAWS = 3000


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> None:
    """Pearson's chi-square far in the tail (p < 1e-6 for dof <= 11): deterministic seeds, so no flakes,
    and a wrong distribution (off by a few percent of mass) still fails."""
    kept = probs > 0
    assert counts[~kept].sum() == 0, "a token of probability 0 was drawn"
    expected = probs[kept] * counts.sum()
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
    dof = max(int(kept.sum()) - 1, 1)
    assert chi2 < dof + 12 * math.sqrt(2 * dof), (chi2, dof, counts.tolist(), (probs * counts.sum()).tolist())


def _draw_counts(logits: torch.Tensor, params: SamplingParams, history=None) -> torch.Tensor:
    v = logits.shape[0]
    rows_ = [RowSampling(params, seed=s, step=s % 5, history=history) for s in range(DRAWS)]
    tokens = sample(logits[None].expand(DRAWS, v).contiguous(), rows_).token_ids
    return torch.bincount(tokens, minlength=v).double()


FIXED = torch.tensor([1.5, -0.5, 0.0, 2.0, -2.0, 0.7, NEG_INF, 1.0])


def _softmax64(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x.double(), -1)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7, 4.0])
def test_draws_follow_softmax_over_temperature(temperature):
    counts = _draw_counts(FIXED, SamplingParams(do_sample=True, temperature=temperature))
    _chi2_ok(counts, _softmax64(FIXED.double() / temperature))


def test_draws_follow_the_top_k_and_top_p_renormalised_distribution():
    # top_k 3: the three highest logits (2.0, 1.5, 1.0), renormalised.
    top3 = torch.full_like(FIXED, NEG_INF, dtype=torch.float64)
    top3[[0, 3, 7]] = FIXED[[0, 3, 7]].double()
    _chi2_ok(_draw_counts(FIXED, SamplingParams(do_sample=True, top_k=3)), _softmax64(top3))
    # top_p 0.6: the smallest most-probable set reaching 0.6 of the mass.
    probs = _softmax64(FIXED)
    order = torch.argsort(probs, descending=True)
    n = int((torch.cumsum(probs[order], 0) < 0.6).sum()) + 1
    nucleus = torch.full_like(probs, NEG_INF)
    nucleus[order[:n]] = FIXED[order[:n]].double()
    _chi2_ok(_draw_counts(FIXED, SamplingParams(do_sample=True, top_p=0.6)), _softmax64(nucleus))


def test_draws_follow_the_penalised_distribution():
    history = torch.tensor([0, 0, 3, 5])
    params = SamplingParams(
        do_sample=True, repetition_penalty=1.8, presence_penalty=0.3, frequency_penalty=0.5
    )
    row = RowSampling(params, 0, 0, history)
    reference = _penalised_reference(FIXED, row)
    _chi2_ok(_draw_counts(FIXED, params, history), _softmax64(reference))


@settings(max_examples=8, deadline=None, derandomize=True)  # derandomized: the same 8 cases on every run
@given(
    logits=st.lists(st.floats(-4.0, 4.0, width=32), min_size=2, max_size=10).map(torch.tensor),
    temperature=st.floats(0.3, 3.0),
)
def test_draws_follow_softmax_for_generated_logits(logits, temperature):
    counts = _draw_counts(logits, SamplingParams(do_sample=True, temperature=temperature))
    _chi2_ok(counts, _softmax64(logits.double() / temperature))


def test_uniforms_are_uniform():
    u = torch.stack([uniforms(s, s % 11, 2) for s in range(4000)])  # first and second uniform of a step
    for col in u.T:
        counts = torch.histc(col, bins=10, min=0.0, max=1.0).double()
        _chi2_ok(counts, torch.full((10,), 0.1, dtype=torch.float64))
