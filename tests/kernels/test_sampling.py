"""The greedy-pick kernel against torch's argmax + log_softmax, which it replaces for all-greedy steps."""

import math

import pytest
import torch

from gorgon.engine.request import SamplingParams
from gorgon.engine.sampler import RowSampling, sample
from gorgon.kernels.build import cpu_extension

pytestmark = pytest.mark.skipif(cpu_extension() is None, reason="CPU lacks AVX-512 kernels")


def _reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids = x.argmax(-1)
    return ids, torch.log_softmax(x, -1).gather(-1, ids[:, None])[:, 0]


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 1000, 49152])
def test_matches_torch_and_takes_the_first_maximum(vocab):
    x = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab)) * 4
    x[1, :] = x[1].max() + 1.0  # every token ties: the first wins
    x[2, vocab // 2] = x[2, -1] = x[2].max() + 1.0  # a tie in the tail lanes
    ids, logprobs = cpu_extension().greedy_pick(x)
    ref_ids, ref_logprobs = _reference(x)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-6, rtol=1e-6)


def test_a_row_gets_the_same_bits_alone_as_in_any_batch():
    x = torch.randn(9, 4099, generator=torch.Generator().manual_seed(1)) * 3
    ids, logprobs = cpu_extension().greedy_pick(x)
    for r in range(9):
        alone_ids, alone_logprobs = cpu_extension().greedy_pick(x[r : r + 1].clone())
        assert alone_ids.item() == ids[r].item()
        assert alone_logprobs.item() == logprobs[r].item() or math.isnan(alone_logprobs.item())


def test_nan_and_impossible_rows_follow_torch():
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(2))
    x[0, [70, 50]] = float("nan")  # torch.argmax: the first NaN
    x[1, :] = float("-inf")  # log_softmax: NaN
    x[2, :] = float("-inf")
    x[2, 33] = 0.0  # one possible token: logprob 0
    ids, logprobs = cpu_extension().greedy_pick(x)
    assert ids.tolist() == [50, 0, 33]
    assert math.isnan(logprobs[0]) and math.isnan(logprobs[1]) and logprobs[2].item() == 0.0


def test_the_sampler_picks_greedy_rows_with_the_kernel():
    x = torch.randn(4, 777, generator=torch.Generator().manual_seed(3)) * 3
    result = sample(x, [RowSampling(SamplingParams(), seed=0, step=i) for i in range(4)])
    ids, logprobs = cpu_extension().greedy_pick(x)
    assert torch.equal(result.token_ids, ids) and torch.equal(result.logprobs, logprobs)
    # Alternatives need the whole distribution: that step keeps torch's path, with the same tokens.
    with_alternatives = sample(x, [RowSampling(SamplingParams(), seed=0, step=i, top_n=2) for i in range(4)])
    assert torch.equal(with_alternatives.token_ids, ids)
    torch.testing.assert_close(with_alternatives.logprobs, logprobs, atol=1e-6, rtol=1e-6)


def test_a_greedy_row_gets_the_same_logprob_beside_sampled_rows():
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(4)) * 3
    greedy = RowSampling(SamplingParams(), seed=0, step=0)
    sampled = RowSampling(SamplingParams(do_sample=True, temperature=0.8), seed=1, step=0)
    alone = sample(x[:1], [greedy])
    mixed = sample(x, [greedy, sampled, greedy])
    assert mixed.token_ids[0] == alone.token_ids[0] and mixed.logprobs[0].item() == alone.logprobs[0].item()
    assert mixed.logprobs[2].item() == sample(x[2:], [greedy]).logprobs[0].item()


@pytest.mark.parametrize(("vocab", "k"), [(13480, 16), (17, 17), (5, 1), (100, 16)])
def test_top_k_rows_match_torch(vocab, k):
    x = torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab))
    values, indices = cpu_extension().top_k_rows(x, k)
    expected = x.topk(k, dim=-1)
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_top_k_rows_put_equal_values_in_index_order():
    x = torch.zeros(1, 40)
    x[0, [30, 5, 7]] = 1.0
    values, indices = cpu_extension().top_k_rows(x, 5)
    assert values.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0]] and indices.tolist() == [[5, 7, 30, 0, 1]]
