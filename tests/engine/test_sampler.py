"""Sampler: transformers parity of the processors, batch invariance, keyed seeding, statistics, fast path."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from gorgon.engine import logits_process as lp
from gorgon.engine.request import SamplingParams
from gorgon.engine.sampler import RowSampling, process_logits, processed_probs, sample, uniforms

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
V = 1000


def _logits(n: int, vocab: int = V, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=gen) * 3).to(device)


def _history(n: int, vocab: int = V, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen)


def _sampled(**kw) -> SamplingParams:
    return SamplingParams(do_sample=True, **kw)


# --- parity with transformers' processors -------------------------------------------------------------------


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    logits = _logits(4)
    hist = torch.stack([_history(50, seed=s) for s in range(4)])
    ref = RepetitionPenaltyLogitsProcessor(penalty)(hist, logits.clone())
    for i in range(4):
        seen = lp.token_counts(hist[i], V) > 0
        assert torch.equal(lp.apply_repetition_penalty(logits[i : i + 1], seen, penalty), ref[i : i + 1])


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.9])
def test_temperature_matches_transformers(temperature):
    logits = _logits(4)
    ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
    assert torch.equal(lp.apply_temperature(logits, temperature), ref)


@pytest.mark.parametrize("top_k", [1, 5, 50, V + 10])
def test_top_k_matches_transformers(top_k):
    logits = _logits(4)
    ref = TopKLogitsWarper(top_k)(None, logits.clone())
    assert torch.equal(lp.top_k_filter(logits, top_k), ref)
    assert ((ref > float("-inf")).sum(-1) == min(top_k, V)).all()


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.9, 0.999])
def test_top_p_matches_transformers(top_p):
    logits = _logits(4)
    ref = TopPLogitsWarper(top_p)(None, logits.clone())
    ours = lp.top_p_filter(logits, top_p)
    assert torch.equal(ours, ref)
    assert ((ours > float("-inf")).sum(-1) >= 1).all()


@pytest.mark.parametrize("typical_p", [0.01, 0.2, 0.5, 0.95])
def test_typical_p_matches_transformers(typical_p):
    logits = _logits(4)
    ref = TypicalLogitsWarper(typical_p)(None, logits.clone())
    ours = lp.typical_filter(logits, typical_p)
    assert torch.equal(ours, ref)
    assert ((ours > float("-inf")).sum(-1) >= 1).all()


def test_warpers_keep_one_token_on_peaked_logits():
    logits = torch.full((1, V), -50.0)
    logits[0, 7] = 50.0
    for out in (lp.top_p_filter(logits, 0.5), lp.typical_filter(logits, 0.5), lp.top_k_filter(logits, 1)):
        assert (out[0] > float("-inf")).nonzero().flatten().tolist() == [7]


def test_full_chain_matches_transformers():
    """Penalty + temperature + top-k + top-p + typical, in transformers' order, through process_logits."""
    logits = _logits(1)
    hist = _history(80)
    params = _sampled(temperature=0.8, top_k=200, top_p=0.95, typical_p=0.9, repetition_penalty=1.2)
    ref = logits.clone()
    for proc in (
        RepetitionPenaltyLogitsProcessor(1.2),
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(200),
        TopPLogitsWarper(0.95),
        TypicalLogitsWarper(0.9),
    ):
        ref = proc(hist[None], ref)
    ours = process_logits(logits, [RowSampling(params, seed=0, step=0, history=hist)])
    assert torch.equal(ours, ref)


def test_frequency_presence_penalty_follows_lorax():
    """logit -= freq * count / len(history) + presence * (count > 0), over prompt and generated tokens."""
    logits = _logits(1)
    hist = torch.tensor([3, 3, 3, 9, 4, 3])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    ours = process_logits(logits, [RowSampling(params, seed=0, step=0, history=hist)])
    ref = logits.clone()
    for tok in set(hist.tolist()):
        count = hist.tolist().count(tok)
        ref[0, tok] = ref[0, tok] - 0.5 * count / len(hist) - 0.25
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    unseen = torch.ones(V, dtype=torch.bool)
    unseen[hist] = False
    assert torch.equal(ours[0, unseen], logits[0, unseen])


def test_history_ids_past_vocab_are_ignored():
    logits = _logits(1)
    hist = torch.tensor([5, V + 3])
    out = process_logits(logits, [RowSampling(SamplingParams(repetition_penalty=2.0), 0, 0, hist)])
    changed = (out != logits).nonzero()[:, 1].tolist()
    assert changed == [5]


def test_process_logits_leaves_input_alone_and_skips_plain_rows():
    logits = _logits(2)
    before = logits.clone()
    rows = [RowSampling(SamplingParams(), 0, 0), RowSampling(_sampled(top_k=3), 0, 0)]
    out = process_logits(logits, rows)
    assert torch.equal(logits, before)
    assert torch.equal(out[0], logits[0])
    assert process_logits(logits, rows[:1] * 2) is logits
    # Warpers do not apply to greedy rows.
    greedy_with_warpers = SamplingParams(do_sample=False, temperature=0.5, top_k=3)
    assert process_logits(logits, [RowSampling(greedy_with_warpers, 0, 0)] * 2) is logits


def test_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="one row per RowSampling"):
        sample(_logits(3), [RowSampling(SamplingParams(), 0, 0)])


def test_penalties_without_history_is_a_value_error():
    with pytest.raises(ValueError, match="history"):
        sample(_logits(1), [RowSampling(SamplingParams(repetition_penalty=1.1), 0, 0)])


# --- greedy ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_with_lowest_id_on_ties(device):
    logits = torch.zeros(2, 16, device=device)
    logits[0, [3, 9, 12]] = 2.0
    logits[1, [15, 1]] = 5.0
    res = sample(logits, [RowSampling(SamplingParams(), 0, 0)] * 2)
    assert res.token_ids.tolist() == [3, 1]
    assert res.token_ids.dtype == torch.long and res.logprobs.dtype == torch.float32
    expected = torch.log_softmax(logits, -1)[[0, 1], [3, 1]]
    torch.testing.assert_close(res.logprobs, expected, atol=1e-6, rtol=1e-6)  # the CPU kernel's own sum


def test_greedy_logprob_is_under_penalised_logits():
    logits = _logits(1)
    hist = _history(30)
    params = SamplingParams(repetition_penalty=1.5, presence_penalty=0.3)
    row = RowSampling(params, 0, 0, hist)
    penalised = process_logits(logits, [row])
    res = sample(logits, [row])
    assert res.token_ids.item() == penalised.argmax().item()
    expected = torch.log_softmax(penalised, -1)[0, res.token_ids.item()].item()
    assert res.logprobs.item() == pytest.approx(expected, abs=1e-6)


def test_temperature_zero_is_greedy():
    logits = _logits(1)
    row = RowSampling(_sampled(temperature=0.0), seed=1, step=0)
    assert sample(logits, [row]).token_ids.item() == logits.argmax().item()


# --- batch invariance -----------------------------------------------------------------------------------------


def _mixed_rows() -> list[RowSampling]:
    hist = [_history(40 + 7 * i, seed=10 + i) for i in range(8)]
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4),
        _sampled(),
        _sampled(temperature=0.7, top_k=20),
        _sampled(temperature=1.3, top_p=0.9),
        _sampled(typical_p=0.8, presence_penalty=0.5),
        _sampled(temperature=0.5, top_k=50, top_p=0.8, typical_p=0.95, repetition_penalty=1.1),
        SamplingParams(presence_penalty=-0.5),
    ]
    return [RowSampling(p, seed=100 + i, step=i, history=hist[i], top_n=i % 4) for i, p in enumerate(params)]


@pytest.mark.parametrize("device", DEVICES)
def test_row_results_do_not_depend_on_the_batch(device):
    logits = _logits(8, device=device)
    rows = _mixed_rows()
    batch = sample(logits, rows)
    batch_processed = process_logits(logits, rows)
    perm = [5, 2, 7, 0, 3, 6, 1, 4]
    shuffled = sample(logits[perm], [rows[j] for j in perm])
    for i, row in enumerate(rows):
        alone_logits = logits[i : i + 1].clone()
        alone = sample(alone_logits, [row])
        assert torch.equal(alone.token_ids[0], batch.token_ids[i])
        assert torch.equal(alone.logprobs[0], batch.logprobs[i])
        assert alone.alternatives[0] == batch.alternatives[i]
        # Fewer when the warpers left fewer tokens than asked for.
        assert 1 <= len(alone.alternatives[0]) <= row.top_n or row.top_n == 0
        assert torch.equal(process_logits(alone_logits, [row])[0], batch_processed[i])
        j = perm.index(i)
        assert torch.equal(shuffled.token_ids[j], batch.token_ids[i])
        assert torch.equal(shuffled.logprobs[j], batch.logprobs[i])
        assert shuffled.alternatives[j] == batch.alternatives[i]


def test_alternatives_are_sorted_and_consistent_with_logprob():
    logits = _logits(1)
    row = RowSampling(_sampled(temperature=0.9), seed=3, step=0, top_n=5)
    res = sample(logits, [row])
    alts = res.alternatives[0]
    assert [a[1] for a in alts] == sorted((a[1] for a in alts), reverse=True)
    lps = torch.log_softmax(logits / 0.9, -1)[0]
    assert alts == [(t, lps[t].item()) for t, _ in alts]
    chosen = res.token_ids.item()
    if chosen in dict(alts):
        assert dict(alts)[chosen] == res.logprobs.item()


def test_alternatives_count_and_removed_tokens():
    rows = [
        RowSampling(SamplingParams(), seed=0, step=0, top_n=7),
        RowSampling(_sampled(top_k=2), seed=0, step=0, top_n=5),
        RowSampling(_sampled(), seed=0, step=0, top_n=0),
    ]
    res = sample(_logits(3), rows)
    assert [len(a) for a in res.alternatives] == [7, 2, 0]


# --- keyed randomness -----------------------------------------------------------------------------------------


def test_uniforms_are_keyed_and_prefix_consistent():
    a = uniforms(42, 7, 4)
    assert a.dtype == torch.float64 and a.device.type == "cpu"
    assert torch.equal(a, uniforms(42, 7, 4))
    assert torch.equal(uniforms(42, 7, 1), a[:1])
    assert not torch.equal(uniforms(42, 8, 4), a)
    assert not torch.equal(uniforms(43, 7, 4), a)
    assert ((a >= 0) & (a < 1)).all()
    # Seeds beyond 32 bits, and negative ones, still matter.
    assert not torch.equal(uniforms(42 + 2**32, 7, 4), a)
    assert not torch.equal(uniforms(-42, 7, 4), a)
    firsts = {uniforms(1, step, 1).item() for step in range(200)}
    assert len(firsts) == 200


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_token_depends_only_on_seed_and_step(device):
    logits = _logits(1, device=device)
    params = _sampled(temperature=1.5)
    target = RowSampling(params, seed=9, step=3)
    alone = sample(logits, [target]).token_ids[0]
    # Earlier tokens of the same request sampled in the same call, and strangers, change nothing.
    rows = [RowSampling(params, 9, 0), RowSampling(params, 9, 1), RowSampling(params, 5, 3), target]
    batch = sample(logits.expand(4, V).contiguous(), rows)
    assert torch.equal(batch.token_ids[3], alone)
    # And repeated calls reproduce it.
    assert torch.equal(sample(logits, [target]).token_ids[0], alone)


def test_same_seed_same_text():
    """A toy autoregressive loop: same seed, same token sequence; another seed differs."""

    def run(seed: int) -> list[int]:
        tokens: list[int] = []
        for step in range(30):
            logits = _logits(1, vocab=50, seed=1000 + (tokens[-1] if tokens else 0))
            row = RowSampling(_sampled(temperature=2.0), seed=seed, step=step)
            tokens.append(sample(logits, [row]).token_ids.item())
        return tokens

    assert run(11) == run(11)
    assert run(11) != run(12)


# --- statistics -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        _sampled(),
        _sampled(temperature=0.7, top_k=6),
        _sampled(temperature=1.4, top_p=0.8),
        _sampled(top_k=8, top_p=0.9, typical_p=0.9),
    ],
)
def test_empirical_frequencies_match_processed_distribution(params):
    vocab, draws = 12, 6000
    logits = torch.linspace(-2.0, 2.0, vocab)[
        torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    ]
    logits = logits[None].expand(draws, vocab).contiguous()
    rows = [RowSampling(params, seed=s, step=s % 7) for s in range(draws)]
    probs = processed_probs(logits[:1], rows[:1])[0].double()
    counts = torch.bincount(sample(logits, rows).token_ids, minlength=vocab).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0, "a filtered token was sampled"
    expected = probs[kept] * draws
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum().item()
    dof = int(kept.sum()) - 1
    # Deterministic seeds, so this cannot flake; the bound is far in the tail (p < 1e-6 for dof <= 11).
    assert chi2 < dof + 12 * math.sqrt(2 * max(dof, 1)), (chi2, dof)


def test_inverse_cdf_never_picks_zero_probability_tokens():
    logits = torch.full((1, 64), float("-inf"))
    logits[0, [0, 31, 63]] = torch.tensor([0.0, 1.0, -1.0])
    seen = {sample(logits, [RowSampling(_sampled(), seed=s, step=0)]).token_ids.item() for s in range(300)}
    assert seen == {0, 31, 63}


# --- fast path ------------------------------------------------------------------------------------------------


class _CountTorchCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _torch_calls(n: int) -> int:
    logits = _logits(n)
    rows = [RowSampling(SamplingParams(), seed=i, step=0) for i in range(n)]
    with _CountTorchCalls() as counter:
        sample(logits, rows)
    return counter.calls


def test_all_greedy_batch_has_no_per_row_tensor_ops():
    # The same handful of batched calls (argmax, log_softmax, gather, and shape queries) whatever N is.
    assert _torch_calls(1) == _torch_calls(48) <= 8
