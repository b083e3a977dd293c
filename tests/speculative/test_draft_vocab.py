import numpy as np
import pytest
import torch

from gorgon.kernels.linear import InvariantLinear
from gorgon.speculative.draft_vocab import DraftVocab
from gorgon.speculative.ngram_table import NgramTable


def test_table_vocabulary_is_its_contexts_and_continuations():
    # min_count 2 drops the contexts seen once: "1 2 7 9" twice, "5 6" once.
    table = NgramTable.build([[1, 2, 7, 9], [1, 2, 7, 9], [5, 6]], min_count=2)
    assert table.vocabulary().tolist() == [1, 2, 7, 9]
    assert NgramTable({}).vocabulary().tolist() == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_are_the_full_lm_head_columns_bitwise(dtype):
    torch.manual_seed(0)
    lm_head = InvariantLinear(64, 300, bias=False, dtype=dtype)
    vocab = DraftVocab([250, 3, 17, 3, 99], vocab_size=300)  # unsorted, a duplicate: kept once, sorted
    assert vocab.ids.tolist() == [3, 17, 99, 250] and len(vocab) == 4
    states = torch.randn(5, 64, dtype=dtype)
    with torch.inference_mode():
        full = lm_head(states).float()
        got = vocab.logits(states, lm_head)
    assert got.dtype == torch.float32
    assert torch.equal(got, full[:, vocab.ids])  # the same kernel per element: no row or column effects
    assert vocab.tokens(torch.tensor([[0, 3]])).tolist() == [[3, 250]]
    with torch.no_grad():  # the base weights change (e.g. reloaded): the copy follows
        lm_head.weight.mul_(2)
    with torch.inference_mode():
        assert torch.equal(vocab.logits(states, lm_head), lm_head(states).float()[:, vocab.ids])


def test_refuses_ids_outside_the_vocabulary():
    with pytest.raises(ValueError):
        DraftVocab([1, 300], vocab_size=300)
    with pytest.raises(ValueError):
        DraftVocab([], vocab_size=300)


def test_rank_over_a_vocabulary_equals_rank_over_the_masked_full_logits():
    """Ranking the vocabulary's columns proposes what ranking full logits would, had every token outside
    it been impossible."""
    table = NgramTable.build([[1, 2, 7, 9]] * 3 + [[4, 5, 6]] * 2, min_count=1, weight=1.0)
    vocab = DraftVocab.from_table(table, vocab_size=12)
    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 12, generator=g)
    masked = torch.full_like(full, -float("inf"))
    masked[:, vocab.ids] = full[:, vocab.ids]
    for context in ([1, 2], [4], [11], [2, 7]):
        want = table.rank(masked, context, top_k=3)
        assert table.rank(full[:, vocab.ids], context, top_k=3, vocab=vocab) == want
        assert all(t in set(vocab.ids.tolist()) for depth in want for t in depth)
    # Tokens 0, 3, 8, 10, 11 are not in the table: never proposed even when the heads like them best.
    full[:, 11] = 50.0
    assert 11 not in np.array(table.rank(full[:, vocab.ids], [1, 2], top_k=3, vocab=vocab))


def test_works_on_weights_made_in_inference_mode():
    """Inference tensors keep no version counter: the copy is keyed without one."""
    with torch.inference_mode():
        lm_head = InvariantLinear(16, 40, bias=False)
        states = torch.randn(2, 16)
        vocab = DraftVocab([1, 5, 39], vocab_size=40)
        assert torch.equal(vocab.logits(states, lm_head), lm_head(states)[:, vocab.ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_joint_logits_are_the_separate_calls_bitwise(dtype):
    torch.manual_seed(1)
    lm_head = InvariantLinear(64, 300, bias=False, dtype=dtype)
    vocab = DraftVocab([250, 3, 17, 99, 101, 102, 103, 104, 105, 200], vocab_size=300)  # 10: a partial tile
    rows, states = torch.randn(3, 64, dtype=dtype), torch.randn(7, 64, dtype=dtype)
    with torch.inference_mode():
        full, draft = vocab.joint_logits(rows, states, lm_head)
        assert full.dtype == draft.dtype == torch.float32
        assert torch.equal(full, lm_head(rows).float())
        assert torch.equal(draft, vocab.logits(states, lm_head))
        with torch.no_grad():
            lm_head.weight.mul_(-1)  # the base weights change: the joint copy follows
        assert torch.equal(vocab.joint_logits(rows, states, lm_head)[0], lm_head(rows).float())


def test_the_runner_drafts_through_the_joint_pass_with_the_same_bits(monkeypatch):
    """A drafted step without LoRA takes its verification logits and its heads' vocabulary logits from one
    pass: the same values as the separate projections."""
    from helpers import gorgon_from_hf, tiny_hf_model

    from gorgon.adapters.medusa import MedusaConfig, MedusaHeads
    from gorgon.engine.kv_cache import KVCache, SlotAllocator
    from gorgon.engine.request import GenerationRequest, SamplingParams, StoppingParams
    from gorgon.engine.runner import ModelRunner
    from gorgon.engine.scheduler import ScheduledChunk, StepPlan
    from gorgon.engine.sequence import Sequence
    from gorgon.speculative.tree import CandidateTree

    cpu, dtype = torch.device("cpu"), torch.bfloat16
    model = gorgon_from_hf(tiny_hf_model("llama"), dtype)
    torch.manual_seed(0)
    config = MedusaConfig(num_heads=2, num_layers=1, version=2, hidden_size=64, vocab_size=320)
    heads = MedusaHeads(config).to(dtype)
    heads.draft_vocab = DraftVocab(range(3, 320, 7), vocab_size=320)
    heads.draft_vocab.joint_pass = (
        True  # as the server's default heads (per-request heads: a call of their own)
    )
    tree = CandidateTree.from_paths([(0,), (1,), (0, 0)])
    runner = ModelRunner(model, KVCache(model.config, 512, dtype, cpu), dtype, cpu, tree=tree)
    alloc = SlotAllocator(512)
    seq = Sequence(
        GenerationRequest([5, 6, 7, 8], SamplingParams(), StoppingParams(max_new_tokens=8)), seed=0
    )
    seq.slots, seq.node_slots = alloc.allocate(seq.max_tokens), alloc.allocate(tree.size)
    runner.run(StepPlan([ScheduledChunk(seq, 0, [5, 6, 7], False, False)]))
    seq.num_cached = 3
    chunk = ScheduledChunk(seq, 3, [8], False, True)
    chunk.draft, chunk.draft_heads = [9, 10, 11], heads
    calls = []
    joint = DraftVocab.joint_logits
    monkeypatch.setattr(DraftVocab, "joint_logits", lambda self, *a: calls.append(a) or joint(self, *a))
    out = runner.run(StepPlan([chunk]))
    assert len(calls) == 1 and calls[0][1].shape == (4 * tree.depth, 64)  # 4 verified rows x 2 heads
    with torch.inference_mode():
        rows = out.hidden[0]  # the root and the 3 tree rows
        assert torch.equal(out.logits[0], model.logits(rows))
        states = heads.hidden_states(rows)[:, : tree.depth]
        expected = heads.draft_vocab.logits(states.reshape(-1, 64), model.lm_head).view(4, tree.depth, -1)
    assert out.draft_logits[0].vocab is heads.draft_vocab
    assert torch.equal(out.draft_logits[0].logits, expected)
