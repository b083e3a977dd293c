"""Speculation inside continuous batching: outputs are bitwise those of plain decoding, greedy or sampled,
in float32 and bfloat16, whatever the drafts and whoever shares the batch."""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers import gorgon_from_hf, tiny_hf_model

from gorgon.config import EngineConfig
from gorgon.engine.llm_engine import LLMEngine
from gorgon.engine.request import FinalOutput, GenerationRequest, SamplingParams, StoppingParams
from gorgon.engine.speculation import SpeculationStats, Speculator
from gorgon.engine.step_times import StepTimes
from gorgon.speculative.tree import CandidateTree

# Exactness tests force drafts on every step; the measured policy has tests of its own below.
CONFIG = EngineConfig(
    max_input_length=200, max_total_tokens=400, max_batch_total_tokens=6000, measure_speculation_cost=False
)


class OracleSpeculator(Speculator):
    """Drafts from known continuations (the plain-decoding outputs), corrupted at random: acceptance is
    high but not total, so every acceptance length occurs."""

    def __init__(self, tree: CandidateTree, futures: dict[tuple, list[int]], wrong: float, seed: int = 0):
        self.tree, self.max_batch_size = tree, 64
        self.futures, self.wrong, self.rng = futures, wrong, random.Random(seed)
        self.stats = SpeculationStats(accepted_per_depth=[0] * tree.depth)
        self.times = StepTimes()

    def draft(self, hidden, seqs):
        trees = []
        for seq in seqs:
            future = self.futures[tuple(seq.request.prompt_ids)][seq.num_generated :]
            nodes = []
            for path in self.tree.paths:
                depth, rank = len(path), path[-1]
                true = future[depth - 1] if depth - 1 < len(future) else 0
                token = true if rank == 0 and self.rng.random() > self.wrong else self.rng.randrange(3, 300)
                nodes.append(token)
            trees.append(nodes)
        return trees


@pytest.fixture(scope="module")
def hf_model(tiny_tokenizer):
    return tiny_hf_model("llama", vocab_size=len(tiny_tokenizer), max_position_embeddings=1024)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, 300, (int(torch.randint(3, 90, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def run(engine, requests, arrivals=None):
    arrivals = arrivals or [0] * len(requests)
    outs: list[list] = [[] for _ in requests]
    step, added = 0, set()
    while len(added) < len(requests) or engine.has_work():
        for i, r in enumerate(requests):
            if i not in added and arrivals[i] <= step:
                engine.add_request(r, outs[i].append)
                added.add(i)
        engine.step()
        step += 1
    return [o[-1] for o in outs]


def request(p, max_new=30, sampling=None, stop=()):
    return GenerationRequest(
        list(p), sampling or SamplingParams(), StoppingParams(max_new, tuple(stop), True)
    )


def engine(hf_model, tok, dtype, speculator=None):
    model = gorgon_from_hf(hf_model, dtype)
    return LLMEngine(model, tok, CONFIG, dtype, torch.device("cpu"), {1}, speculator)


SAMPLED = SamplingParams(
    do_sample=True, temperature=0.8, top_k=40, seed=3, repetition_penalty=1.3, presence_penalty=0.5
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tree", ["chain-3", "tree-8", "tree-16"])
def test_speculative_outputs_equal_plain_decoding(hf_model, tiny_tokenizer, dtype, tree):
    ps = prompts(5, seed=1)
    reqs = [request(p, sampling=SAMPLED if i % 2 else None) for i, p in enumerate(ps)]
    plain = run(engine(hf_model, tiny_tokenizer, dtype), reqs)
    futures = {tuple(p): [t.id for t in f.tokens] for p, f in zip(ps, plain)}
    spec = OracleSpeculator(CandidateTree.load(tree), futures, wrong=0.3)
    fast = run(engine(hf_model, tiny_tokenizer, dtype, spec), reqs, arrivals=[0, 0, 2, 5, 6])
    for a, b in zip(plain, fast):
        assert isinstance(b, FinalOutput)
        assert [(t.id, t.logprob) for t in a.tokens] == [(t.id, t.logprob) for t in b.tokens]
        assert b.generated_text == a.generated_text and b.finish_reason == a.finish_reason
    stats = spec.stats
    assert stats.mean_tokens_per_step > 1.5, stats  # drafts were really accepted...
    assert stats.accepted_per_depth[0] < stats.verified_sequences  # ...and really rejected
    assert sum(b.skipped_tokens for b in fast) == sum(len(b.tokens) for b in fast) - sum(
        1 for b in fast for t in b.tokens if not t.skipped
    )
    assert any(t.skipped for b in fast for t in b.tokens)


def test_stops_inside_an_accepted_draft(hf_model, tiny_tokenizer):
    p = prompts(1, seed=2)[0]
    (plain,) = run(engine(hf_model, tiny_tokenizer, torch.float32), [request(p, max_new=40)])
    text = plain.generated_text
    stop = text[20:23]
    futures = {tuple(p): [t.id for t in plain.tokens]}
    for req in (request(p, max_new=40, stop=[stop]), request(p, max_new=13)):
        (a,) = run(engine(hf_model, tiny_tokenizer, torch.float32), [req])
        spec = OracleSpeculator(CandidateTree.load("chain-4"), futures, wrong=0.0)
        (b,) = run(engine(hf_model, tiny_tokenizer, torch.float32, spec), [req])
        assert [t.id for t in a.tokens] == [t.id for t in b.tokens]
        assert (a.generated_text, a.finish_reason) == (b.generated_text, b.finish_reason)


def test_kv_slots_are_all_returned(hf_model, tiny_tokenizer):
    ps = prompts(4, seed=3)
    plain = run(engine(hf_model, tiny_tokenizer, torch.float32), [request(p) for p in ps])
    futures = {tuple(p): [t.id for t in f.tokens] for p, f in zip(ps, plain)}
    eng = engine(
        hf_model, tiny_tokenizer, torch.float32, OracleSpeculator(CandidateTree.load("tree-16"), futures, 0.2)
    )
    free = eng.scheduler.allocator.num_free
    run(eng, [request(p) for p in ps])
    assert eng.scheduler.allocator.num_free == free
    assert len(set(eng.scheduler.allocator._free)) == free  # no slot handed out twice


def test_policy_turns_speculation_off_for_large_batches(hf_model, tiny_tokenizer):
    ps = prompts(6, seed=4)
    reqs = [request(p, max_new=4 + 6 * i) for i, p in enumerate(ps)]  # the batch shrinks as they finish
    plain = run(engine(hf_model, tiny_tokenizer, torch.float32), reqs)
    futures = {tuple(p): [t.id for t in f.tokens] for p, f in zip(ps, plain)}
    spec = OracleSpeculator(CandidateTree.load("chain-2"), futures, 0.0)
    spec.max_batch_size = 3
    fast = run(engine(hf_model, tiny_tokenizer, torch.float32, spec), reqs)
    assert [[t.id for t in f.tokens] for f in fast] == [[t.id for t in f.tokens] for f in plain]
    assert spec.stats.steps_off > 0 and spec.stats.steps_on > 0


def test_ngram_lookup():
    from gorgon.engine.speculation import lookup

    assert lookup([5, 6, 7, 8, 5, 6], 3, 3) == [7, 8, 5]
    assert lookup([1, 2, 3, 9, 2, 3, 4, 2, 3], 2, 3) == [4, 2]  # the latest occurrence wins
    assert lookup([1, 2, 3], 4, 3) == []
    assert lookup([4, 4, 4, 4], 2, 2) == [4, 4]


def test_ngram_speculation_is_exact_and_accepts_repeats(hf_model, tiny_tokenizer):
    from gorgon.engine.speculation import NgramSpeculator

    # A prompt that repeats itself: the random model's continuation often copies, and drafts find it.
    base = prompts(1, seed=5)[0][:12]
    reqs = [request(base * 4, max_new=40), request(prompts(1, seed=6)[0], max_new=40, sampling=SAMPLED)]
    plain = run(engine(hf_model, tiny_tokenizer, torch.float32), reqs)
    spec = NgramSpeculator(num_tokens=4, max_batch_size=8)
    fast = run(engine(hf_model, tiny_tokenizer, torch.float32, spec), reqs)
    for a, b in zip(plain, fast):
        assert [(t.id, t.logprob) for t in a.tokens] == [(t.id, t.logprob) for t in b.tokens]
    assert spec.stats.verified_sequences > 0


def test_measured_policy_speculates_only_where_it_pays():
    from gorgon.engine.speculation import StepCost

    spec = OracleSpeculator(CandidateTree.load("chain-3"), {}, 0.0)
    # Memory-bound up to 16 rows, then compute-bound: 4 rows per sequence-step with drafts.
    spec.cost = StepCost((1, 16, 64), (0.010, 0.011, 0.044))
    spec.stats.verified_sequences, spec.stats.emitted_tokens = 100, 200  # 2 tokens per step measured
    assert spec.should_speculate(1) and spec.should_speculate(4)
    assert not spec.should_speculate(16)  # 64 rows cost 4x one decode row step: 2 tokens do not pay
    spec.stats.emitted_tokens = 100  # drafts never accepted: 1 token per step
    assert not spec.should_speculate(1)
    assert StepCost((1, 8), (1.0, 2.0)).seconds(15) == pytest.approx(3.0)  # extrapolated


def test_step_times_recent_fastest_and_exploration():
    times = StepTimes(window=2, min_samples=2, explore_every=10, burst=2)
    assert times.seconds(4, True) is None
    times.record(4, True, 0.010)
    assert times.seconds(4, True) is None  # one step is not trusted yet
    times.record(4, True, 0.020)  # a step slowed by interference...
    assert times.seconds(4, True) == pytest.approx(0.010)  # ...does not move the figure: the fastest recent
    times.record(4, True, 0.030)
    assert times.seconds(4, True) == pytest.approx(0.020)  # the window moved on (contexts grow)
    # A close call (gain 1.05) and the other mode has no trusted mean: after `burst` decisions it is run for
    # `burst` decisions.
    assert [times.decide(4, 1.05) for _ in range(2)] == [True, False]
    times.record(4, False, 0.01)
    times.record(4, False, 0.01)
    assert times.decide(4, 1.05) is False  # the burst's end
    # Both known: the preferred mode, except a burst of the other one every `explore_every` decisions.
    decisions = [times.decide(4, 1.05) for _ in range(40)]
    assert decisions.count(False) == 8 and decisions[:8] == [True] * 8
    assert times.decide(5, 0.95) is False  # loads are separate
    # A clear verdict for drafts: the untrusted plain mode is measured after `explore_every` decisions.
    decisions = [times.decide(7, 2.0) for _ in range(12)]
    assert [i for i, d in enumerate(decisions) if not d] == [9, 10]
    # A clear verdict against drafts (they halve throughput): a burst of drafts comes only every 4 x
    # explore_every decisions times the verdict's distance from even in clear margins (0.5 is 7.27 margins
    # of 1.1 from 1): every round(4 x 10 x 7.27) = 291 decisions, the first one too. While drafts have no
    # trusted figure, the burst lasts until they have one: the switch's first step (no draft to verify
    # yet), then `min_samples` timed steps.
    decisions = [times.decide(6, 0.5) for _ in range(300)]
    assert [i for i, d in enumerate(decisions) if d] == [290, 291, 292]
    times.record(6, True, 0.02)
    times.record(6, True, 0.02)
    # Once measured, bursts of `burst` decisions (the count began 10 decisions before this list).
    decisions = [times.decide(6, 0.5) for _ in range(700)]
    assert [i for i, d in enumerate(decisions) if d] == [281, 282, 572, 573]
    # By default a 0.78x verdict (drafts at 8 concurrent code requests on this CPU) is clear (2.6 margins):
    # one burst in 700 decisions, not one every 64.
    times = StepTimes()
    for _ in range(3):
        times.record(8, True, 0.070)
        times.record(8, False, 0.028)
    decisions = [times.decide(8, 0.78) for _ in range(1400)]
    assert [i for i, d in enumerate(decisions) if d] == [666, 667, 668, 1333, 1334, 1335]  # every 667


def test_policy_trusts_measured_step_times_over_the_start_up_table():
    from gorgon.engine.speculation import StepCost

    spec = OracleSpeculator(CandidateTree.load("chain-3"), {}, 0.0)
    spec.cost = StepCost((1, 64), (0.010, 0.011))  # the table says drafts are nearly free
    spec.stats.verified_sequences, spec.stats.emitted_tokens = 100, 150  # 1.5 tokens per step
    spec.times = StepTimes(explore_every=1000)
    assert spec.should_speculate(2)
    for _ in range(3):  # but measured steps with drafts take twice a plain step's time
        spec.times.record(2, True, 0.020)
        spec.times.record(2, False, 0.010)
    assert sum(spec.should_speculate(2) for _ in range(100)) == 0
    for _ in range(20):  # cheaper steps with drafts (e.g. shorter contexts, no LoRA): on again
        spec.times.record(2, True, 0.012)
    assert spec.should_speculate(2) and spec.should_speculate(1)


def test_unmeasured_loads_borrow_the_nearest_measured_ratio():
    """A load not timed yet takes its nearest timed load's ratio, scaled as the start-up table scales it:
    with 4 sequences, steps with drafts measure 2.0x a plain step where the table said 1.6x, so 3 sequences
    (table: 1.4x, which 1.65 tokens per step would pay for) start without drafts instead of first paying for
    the table's optimism; 1 sequence, far cheaper by the table, still speculates."""
    from gorgon.engine.speculation import StepCost

    spec = OracleSpeculator(CandidateTree.load("chain-3"), {}, 0.0)  # 4 rows per sequence-step with drafts
    # The start-up table the embedded model logged on this CPU (rows -> seconds).
    spec.cost = StepCost((1, 4, 8, 16, 32), (0.0139, 0.0147, 0.0169, 0.0235, 0.0400))
    spec.stats.verified_sequences, spec.stats.emitted_tokens = 100, 165  # 1.65 tokens per step
    spec.times = StepTimes(explore_every=1000)
    assert spec.step_ratio(3) == pytest.approx(spec._table_ratio(3)) == pytest.approx(1.40, abs=0.01)
    assert spec.should_speculate(3)  # nothing measured yet: the table's word
    for _ in range(3):
        spec.times.record(4, True, 0.030)
        spec.times.record(4, False, 0.015)
    assert spec.times.nearest_ratio(3) == (4, pytest.approx(2.0))
    assert spec.step_ratio(3) == pytest.approx(2.0 * spec._table_ratio(3) / spec._table_ratio(4))
    assert sum(spec.should_speculate(3) for _ in range(50)) < 5  # off, bar a short measuring burst
    assert spec.step_ratio(1) < 1.65 / 1.2 and all(spec.should_speculate(1) for _ in range(20))
    assert spec.times.nearest_ratio(6) == (4, pytest.approx(2.0))
    for _ in range(3):  # a nearer measured load wins; a tie goes to the lighter load
        spec.times.record(8, True, 0.060)
        spec.times.record(8, False, 0.020)
    assert spec.times.nearest_ratio(7) == (8, pytest.approx(3.0))
    assert spec.times.nearest_ratio(6) == (4, pytest.approx(2.0))


def test_engine_times_its_steps_and_stops_speculating_when_drafts_cost_more(
    hf_model, tiny_tokenizer, monkeypatch
):
    """End to end: the engine's clock (virtual here, so the test is deterministic) shows steps with drafts
    taking 4x a plain step; speculation turns off within a request, though the start-up table priced it as
    cheap; outputs unchanged."""
    from gorgon.engine import llm_engine
    from gorgon.engine.runner import ModelRunner

    ps = prompts(2, seed=8)
    reqs = [request(p, max_new=80) for p in ps]
    plain = run(engine(hf_model, tiny_tokenizer, torch.float32), reqs)
    futures = {tuple(p): [t.id for t in f.tokens] for p, f in zip(ps, plain)}
    spec = OracleSpeculator(CandidateTree.load("chain-2"), futures, wrong=0.5)  # ~1.7 tokens per step
    spec.times = StepTimes(explore_every=8)
    config = EngineConfig(max_input_length=200, max_total_tokens=400, max_batch_total_tokens=6000)
    model = gorgon_from_hf(hf_model, torch.float32)
    eng = LLMEngine(model, tiny_tokenizer, config, torch.float32, torch.device("cpu"), {1}, spec)
    assert spec.cost is not None

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

        def monotonic(self):
            return self.now

    clock = Clock()
    real_run = ModelRunner.run

    def run_on_the_clock(self, plan):
        clock.now += 0.040 if any(chunk.draft for chunk in plan.chunks) else 0.010
        return real_run(self, plan)

    monkeypatch.setattr(llm_engine, "time", clock)
    monkeypatch.setattr(ModelRunner, "run", run_on_the_clock)
    fast = run(eng, reqs)
    assert [[t.id for t in f.tokens] for f in fast] == [[t.id for t in f.tokens] for f in plain]
    assert spec.times.seconds(2, True) == pytest.approx(0.040)
    assert spec.times.seconds(2, False) == pytest.approx(0.010)
    assert spec.stats.steps_off > 2 * spec.stats.steps_on  # off once measured, after a few steps on


def test_cost_is_measured_at_start(hf_model, tiny_tokenizer):
    spec = OracleSpeculator(CandidateTree.load("chain-2"), {}, 0.0)
    config = EngineConfig(max_input_length=200, max_total_tokens=400, max_batch_total_tokens=6000)
    model = gorgon_from_hf(hf_model, torch.float32)
    LLMEngine(model, tiny_tokenizer, config, torch.float32, torch.device("cpu"), {1}, spec)
    assert spec.cost is not None and spec.cost.rows[0] == 1 and all(t > 0 for t in spec.cost.seconds_at)


def test_typical_acceptance_greedy_unchanged_and_sampled_accepts_more(hf_model, tiny_tokenizer):
    """--speculative-sampling typical: greedy rows are untouched; sampled rows keep more drafts."""
    import math

    ps = prompts(4, seed=5)
    greedy = [request(p) for p in ps]
    plain = run(engine(hf_model, tiny_tokenizer, torch.float32), greedy)
    futures = {tuple(p): [t.id for t in f.tokens] for p, f in zip(ps, plain)}
    tree = CandidateTree.load("chain-3")

    def spec(typical: bool):
        s = OracleSpeculator(tree, futures, wrong=0.0)
        s.typical = typical
        return s

    typ = spec(True)
    out = run(engine(hf_model, tiny_tokenizer, torch.float32, typ), greedy)
    assert [[t.id for t in o.tokens] for o in out] == [[t.id for t in o.tokens] for o in plain]

    # Sampled requests drafted with the greedy continuation: lossless acceptance keeps a draft only when the
    # draw lands on it; typical acceptance keeps it whenever it is likely enough.
    sampled = [
        request(p, sampling=SamplingParams(do_sample=True, temperature=0.7, seed=i)) for i, p in enumerate(ps)
    ]
    results = {}
    for typical in (False, True):
        s = spec(typical)
        outs = run(engine(hf_model, tiny_tokenizer, torch.float32, s), sampled)
        assert all(isinstance(o, FinalOutput) and len(o.tokens) == 30 for o in outs)
        assert all(math.isfinite(t.logprob) for o in outs for t in o.tokens)
        results[typical] = s.stats.mean_tokens_per_step
    assert results[True] > results[False], results


def test_ngram_branch_fills_its_nodes_and_stays_exact(hf_model, tiny_tokenizer):
    """--medusa-ngram-branch: an extra chain of nodes (rank past the tree's widest) filled by prompt lookup,
    or by the heads' next guesses when nothing matches; outputs stay those of plain decoding."""
    from gorgon.adapters.medusa import MedusaConfig, MedusaHeads

    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(num_heads=3, num_layers=1, version=2, hidden_size=64, vocab_size=320))
    model = gorgon_from_hf(hf_model, torch.float32)
    spec = Speculator(heads, model.lm_head, CandidateTree.load("tree-8"), 64, ngram_branch=3)
    assert spec.tree.size == 11 and len(spec.ngram_nodes) == 3
    assert [spec.tree.paths[i] for i in spec.ngram_nodes] == [(3,), (3, 3), (3, 3, 3)]

    from types import SimpleNamespace

    logits = torch.randn(3, 320)
    logits[0, 7] = -100.0  # not a first-level guess (see the duplicate case below)
    repeat = SimpleNamespace(
        token_ids=[5, 6, 7, 8, 9, 5, 6], medusa=None
    )  # "5 6" occurred before, followed by 7 8 9
    nodes = spec.tree_from_logits(logits, repeat)
    assert [nodes[i] for i in spec.ngram_nodes] == [7, 8, 9]
    fresh = SimpleNamespace(
        token_ids=[1, 2, 3], medusa=None
    )  # no match: the branch keeps the heads' rank-3 guesses
    guesses = logits.topk(4, dim=-1).indices
    assert [spec.tree_from_logits(logits, fresh)[i] for i in spec.ngram_nodes] == guesses[:, 3].tolist()
    logits[0, 7] = 100.0  # head 0's top guess is the lookup's 7: a second row for it would be wasted
    guesses = logits.topk(4, dim=-1).indices
    assert [spec.tree_from_logits(logits, repeat)[i] for i in spec.ngram_nodes] == guesses[:, 3].tolist()

    # Repetitive prompts, so the branch matches; outputs equal plain decoding.
    ps = [[5, 6, 7, 8, 9] * 6, [40, 41, 42] * 10]
    reqs = [request(p) for p in ps]
    plain = run(engine(hf_model, tiny_tokenizer, torch.float32), reqs)
    spec = Speculator(heads, model.lm_head, CandidateTree.load("chain-2"), 64, ngram_branch=3)
    fast = run(engine(hf_model, tiny_tokenizer, torch.float32, spec), reqs)
    assert [[t.id for t in o.tokens] for o in fast] == [[t.id for t in o.tokens] for o in plain]
    assert spec.stats.verified_sequences > 0


def test_freed_slots_are_handed_out_again_in_order():
    """Speculation shuffles a sequence's slots (accepted nodes' slots swap into its positions); once freed,
    the next sequence still gets the lowest free slots, ascending, so its keys and values stay contiguous."""
    from gorgon.engine.kv_cache import SlotAllocator

    alloc = SlotAllocator(64)
    first = alloc.allocate(10)
    assert first == list(range(1, 11))
    shuffled = first[:3] + [first[9], first[4], first[3]] + first[5:9]
    alloc.free(shuffled)
    assert alloc.allocate(12) == list(range(1, 13))


@pytest.mark.parametrize("shared", [False, True])
def test_time_forward_touches_only_the_scratch_slot(shared, monkeypatch):
    """The start-up and tune-tree cost probes run on the live engine's cache: no request's keys may change.
    `shared` (a tree's rows over one sequence's keys) and separate sequences both run."""
    from gorgon.engine.runner import time_forward
    from gorgon.speculative.tune import VerifyCost

    model = gorgon_from_hf(tiny_hf_model("llama"), torch.float32)
    engine = LLMEngine(model, None, CONFIG, torch.float32, torch.device("cpu"), set())
    for k, v in engine.cache.layers:
        k.normal_(), v.normal_()
    before = [(k.clone(), v.clone()) for k, v in engine.cache.layers]
    assert time_forward(engine.runner, 5, repeats=1, context=40, head_depth=2, shared=shared) > 0
    for (k, v), (k0, v0) in zip(engine.cache.layers, before):
        assert torch.equal(k[1:], k0[1:]) and torch.equal(v[1:], v0[1:])
    # tune-tree prices a candidate tree as one sequence's rows.
    seen = {}
    monkeypatch.setattr("gorgon.engine.runner.time_forward", lambda *a, **kw: seen.update(kw) or 0.01)
    VerifyCost(engine.runner)(3, 2)
    assert seen["shared"] is True and seen["head_depth"] == 2


CHAIN_3 = [(0,), (0, 0), (0, 0, 0)]


def test_pruned_tree_verifies_only_the_nodes_whose_drafts_score_high_enough():
    """A tree with `prune_below` drops its trailing (deepest) nodes whose path score (summed head
    log-probabilities, no table here) is below it; a node the n-gram lookup filled is always kept."""
    from types import SimpleNamespace

    from gorgon.adapters.medusa import MedusaConfig, MedusaHeads

    heads = MedusaHeads(MedusaConfig(num_heads=3, num_layers=1, version=2, hidden_size=64, vocab_size=320))
    logits = torch.zeros(3, 320)
    logits[0, 11] = 30.0  # head 0 is sure (log-probability ~0); heads 1 and 2 are flat (-log 320 each)
    flat = -math.log(320)
    fresh = SimpleNamespace(token_ids=[1, 2, 3], medusa=None)

    def nodes(prune_below, branch=0, seq=fresh):
        tree = CandidateTree.from_paths(CHAIN_3, prune_below)
        spec = Speculator(heads, None, tree, 64, ngram_branch=branch)
        return spec.tree_from_logits(logits, seq)

    full = nodes(None)
    assert len(full) == 3 and full[0] == 11
    assert nodes(2 * flat - 0.5) == full  # every path scores above: nothing pruned
    assert nodes(2 * flat + 0.5) == full[:2]  # [0, 0, 0] scores 2 flat: pruned
    assert nodes(flat + 0.5) == full[:1]
    assert nodes(-0.5) == full[:1] and nodes(0.5) == []  # even head 0's sure guess scores just below 0
    # With an n-gram node ([1], second in the list): kept when the lookup filled it, which stops pruning.
    repeat = SimpleNamespace(token_ids=[5, 6, 7, 8, 5, 6], medusa=None)  # "5 6" was followed by 7
    assert nodes(0.5, branch=1, seq=repeat) == [11, 7]
    assert nodes(0.5, branch=1, seq=fresh) == []  # no match: it holds a flat guess of head 0, pruned too


def _recording(tree_from_logits, sizes: list[int]):
    """`tree_from_logits`, noting how many nodes each drafted tree kept."""

    def wrapper(*args, **kwargs):
        nodes = tree_from_logits(*args, **kwargs)
        sizes.append(len(nodes))
        return nodes

    return wrapper


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_trees_stay_exact(hf_model, tiny_tokenizer, dtype):
    """Steps verify trees of varying size (some none at all); outputs stay those of plain decoding."""
    from gorgon.adapters.medusa import MedusaConfig, MedusaHeads

    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(num_heads=3, num_layers=1, version=2, hidden_size=64, vocab_size=320))
    heads.to(dtype)
    ps = [[5, 6, 7, 8, 9] * 6, [40, 41, 42] * 10, *prompts(2, seed=4)]
    reqs = [request(p, sampling=SAMPLED if i == 3 else None) for i, p in enumerate(ps)]
    plain = run(engine(hf_model, tiny_tokenizer, dtype), reqs)
    sizes = []
    for prune_below in (-11.6, 0.5):
        model = gorgon_from_hf(hf_model, dtype)
        tree = CandidateTree.from_paths(CHAIN_3, prune_below)
        spec = Speculator(heads, model.lm_head, tree, 64, ngram_branch=1)
        spec.tree_from_logits = _recording(spec.tree_from_logits, sizes)
        fast_engine = LLMEngine(model, tiny_tokenizer, CONFIG, dtype, torch.device("cpu"), {1}, spec)
        fast = run(fast_engine, reqs, arrivals=[0, 1, 1, 3])
        for a, b in zip(plain, fast):
            assert [(t.id, t.logprob) for t in a.tokens] == [(t.id, t.logprob) for t in b.tokens]
    assert {0, 2, 3} <= set(sizes), sorted(set(sizes))  # none; head 0 and the n-gram node; one deeper
