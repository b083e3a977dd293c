"""Candidate trees, acceptance against a brute-force reference, and the tree tuner."""

import itertools
import json
import math
import random

import pytest
import torch

from gorgon.engine.speculation import with_ngram_branch
from gorgon.speculative.tree import BUILTIN_TREES, CandidateTree
from gorgon.speculative.tune import (
    PositionDrafts,
    best_trees,
    chain_hits,
    choose_tree,
    head_accuracy,
    ngram_hits,
    prune_choice,
)
from gorgon.speculative.verify import accept, emitted_tokens


def test_tree_structure():
    tree = CandidateTree.load("tree-8")
    assert tree.size == 8 and tree.depth == 3 and tree.top_k == 3
    for i, path in enumerate(tree.paths):
        chain = tree.ancestors[i]
        assert [tree.paths[a] for a in chain] == [path[: d + 1] for d in range(len(path))]
    with pytest.raises(ValueError, match="no parent"):
        CandidateTree.from_paths([(0,), (1, 0)])
    with pytest.raises(ValueError, match="only 2 heads"):
        CandidateTree.load("chain-3").check_heads(2)
    with pytest.raises(ValueError, match="Unknown Medusa tree"):
        CandidateTree.load("no-such-tree")


def test_tree_from_json_file(tmp_path):
    f = tmp_path / "tree.json"
    f.write_text(json.dumps([[0], [1], [0, 0]]))
    tree = CandidateTree.load(str(f))
    assert tree.paths == ((0,), (1,), (0, 0)) and tree.prune_below is None
    assert tree.to_json() == [[0], [1], [0, 0]]  # a tree without pruning is written as Medusa choices


def test_tree_file_with_prune_below(tmp_path):
    f = tmp_path / "tree.json"
    f.write_text(json.dumps({"paths": [[0], [0, 0]], "prune_below": -9}))
    tree = CandidateTree.load(str(f))
    assert tree.paths == ((0,), (0, 0)) and tree.prune_below == -9.0
    assert CandidateTree.from_json(tree.to_json()) == tree
    assert CandidateTree.from_json({"paths": [[0]], "prune_below": None}).prune_below is None
    for bad in (
        {"paths": [[0]], "prune_below": "low"},
        {"paths": [[0]], "prune_below": True},
        {"paths": [[0]], "prune_below": float("nan")},
        {"paths": [[0]], "prune_below": -5, "depth": 3},
        {"prune_below": -5},
        [0, 1],
    ):
        with pytest.raises(ValueError, match="Medusa tree"):
            CandidateTree.from_json(bad)


def brute_force_accept(tree, nodes, targets):
    """Longest root path whose every node equals its parent's target, by enumerating all paths."""
    best = []
    for i, path in enumerate(tree.paths):
        chain = list(tree.ancestors[i])
        rows = [0] + [a + 1 for a in chain[:-1]]
        if all(nodes[n] == targets[r] for n, r in zip(chain, rows)) and len(chain) > len(best):
            best = chain
    return best


@pytest.mark.parametrize("name", sorted(BUILTIN_TREES))
def test_accept_matches_brute_force(name):
    tree = CandidateTree.load(name)
    rng = random.Random(0)
    for _ in range(500):
        nodes = [rng.randrange(4) for _ in range(tree.size)]
        targets = [rng.randrange(4) for _ in range(tree.size + 1)]
        path = accept(tree, nodes, targets)
        # Acceptance is greedy over siblings; with duplicate sibling tokens several paths tie in length only
        # when they emit the same tokens, so compare lengths and emitted tokens.
        ref = brute_force_accept(tree, nodes, targets)
        assert len(path) == len(ref)
        assert emitted_tokens(path, targets)[: len(path)] == [nodes[n] for n in path]


def _independent(p: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Node acceptances as products of per-head accuracies [heads, top_k] (test inputs only)."""
    return {
        n: float(torch.tensor([p[k, r] for k, r in enumerate(n)]).prod())
        for d in range(1, p.shape[0] + 1)
        for n in itertools.product(range(p.shape[1]), repeat=d)
    }


def test_best_trees_take_the_likeliest_nodes():
    acceptance = _independent(torch.tensor([[0.6, 0.2, 0.1], [0.4, 0.1, 0.05], [0.3, 0.1, 0.0]]))
    trees = best_trees(acceptance, 6)
    assert trees[0][0].paths == ((0,),) and trees[0][1] == pytest.approx(1.6)
    # Exhaustive check for size 4: no other parent-closed set of 4 nodes has a larger expectation.
    best4 = max(
        (s for s in itertools.combinations(acceptance, 4) if all(len(n) == 1 or n[:-1] in s for n in s)),
        key=lambda s: sum(acceptance[n] for n in s),
    )
    assert trees[3][1] == pytest.approx(1 + sum(acceptance[n] for n in best4))


def test_best_trees_keep_parents_on_ties_and_skip_unseen_nodes():
    # Measured: whenever head 0 was right, head 1 was too (a tie), and no other node was ever accepted.
    trees = best_trees({(0, 0): 0.3, (0,): 0.3}, 5)
    assert [t.paths for t, _ in trees] == [((0,),), ((0,), (0, 0))]
    assert trees[-1][1] == pytest.approx(1.6)


def test_chain_hits_follow_the_accepted_path():
    future = [9, 1, 2, 3, 4, 5]
    # Row t guesses future[t + 1 + k] at head k: row 0 with ranks 1 then 0, then a miss at head 2.
    guesses = torch.tensor(
        [
            [[7, 1], [2, 8], [8, 8]],  # (1,), (1, 0), then head 2 misses 3
            [[2, 7], [7, 7], [4, 7]],  # (0,), then head 1 misses: (0, x, 0) is never reached
            [[7, 7], [4, 7], [5, 7]],  # head 0 misses: nothing, whatever deeper heads say
        ]
    )
    assert chain_hits(guesses, future) == {(1,): 1, (1, 0): 1, (0,): 1}


def test_choose_tree_trades_tokens_for_cost():
    from gorgon.engine.speculation import StepCost

    acceptance = _independent(torch.tensor([[0.5, 0.2], [0.3, 0.1]]))
    cheap = StepCost((1, 64), (0.01, 0.0101))  # verification nearly free: take every node
    costly = StepCost((1, 2, 64), (0.01, 0.02, 0.64))  # every row costs a full step: take none but one
    assert choose_tree(acceptance, lambda rows, depth: cheap.seconds(rows), 6)[0].tree.size == 6
    assert choose_tree(acceptance, lambda rows, depth: costly.seconds(rows), 6)[0].tree.size == 1


def test_choose_tree_counts_the_ngram_node():
    """The n-gram node costs a row and adds its measured gain for the tree's first-level width."""
    acceptance = _independent(torch.tensor([[0.3, 0.1], [0.1, 0.05]]))
    seen = []

    def cost(rows, depth):
        seen.append((rows, depth))
        return 0.01 * (1 + 0.01 * rows)

    plain = choose_tree(acceptance, cost, 3)[1]
    with_ngram = choose_tree(acceptance, cost, 3, torch.tensor([0.2, 0.15]))[1]
    for a, b in zip(plain, with_ngram):
        width = a.tree.top_k
        assert b.expected_tokens == pytest.approx(a.expected_tokens + [0.2, 0.15][width - 1])
    assert (2, 1) in seen and (3, 1) in seen  # the same one-node tree, with and without its n-gram row


def _two_kinds_of_rows(n: int = 40) -> PositionDrafts:
    """Rows where the heads are sure and right two deep, and rows where head 1 is unsure and wrong."""
    sure = torch.tensor([[-0.1, -3.0], [-0.2, -3.0]])
    unsure = torch.tensor([[-0.1, -3.0], [-6.0, -6.5]])
    hits = [(0, 0) if i % 2 == 0 else (0,) for i in range(n)]
    scores = torch.stack([sure if i % 2 == 0 else unsure for i in range(n)])
    return PositionDrafts(hits, scores)


def test_prune_choice_drops_deep_nodes_only_where_their_drafts_score_low():
    drafts = _two_kinds_of_rows()
    tree = CandidateTree.load("chain-2")
    expected = 1 + 1.0 + 0.5  # [0] always accepted, [0, 0] on half the rows

    def costly(rows, depth):  # every verified row costs a tenth of a step
        return 0.01 * (1 + 0.1 * (rows - 1))

    fit = prune_choice(tree, (), drafts, expected, costly, 0)
    assert fit.tree.paths == tree.paths and -6.2 <= fit.tree.prune_below < -0.3
    assert fit.expected_tokens == pytest.approx(expected)  # only rejected nodes were pruned
    assert fit.step_seconds == pytest.approx(0.01 * (1.2 + 1.1) / 2)
    # Rows that cost nothing are never worth pruning.
    free = prune_choice(tree, (), drafts, expected, lambda rows, depth: 0.01, 0)
    assert free.tree.prune_below is None and free.tokens_per_second == pytest.approx(expected / 0.01)
    # The n-gram node last in the list is always kept, so nothing before it can be pruned.
    served, ngram_nodes = with_ngram_branch(CandidateTree.load("chain-1"), 1)
    one_deep = PositionDrafts([(0,)] * 4, torch.full((4, 1, 2), -15.0))
    assert prune_choice(served, ngram_nodes, one_deep, 1.5, costly, 1).tree.prune_below is None


def test_choose_tree_fits_pruning_from_the_drafts():
    drafts = _two_kinds_of_rows()
    acceptance = {(0,): 1.0, (0, 0): 0.5, (1,): 0.0, (0, 1): 0.0}

    def cost(rows, depth):  # every verified row costs a tenth of a step
        return 0.01 * (1 + 0.1 * (rows - 1))

    best, _ = choose_tree(acceptance, cost, 2, None, drafts)
    assert best.tree.paths == ((0,), (0, 0)) and best.tree.prune_below is not None
    fixed, _ = choose_tree(acceptance, cost, 2)
    assert fixed.tree.prune_below is None and best.tokens_per_second > fixed.tokens_per_second


def test_ngram_hits_count_only_new_tokens():
    # prompt "5 6 7 8", answer "1 5 6 7 9 ...": after "5" the lookup proposes 6, after "6" it proposes 7.
    prompt, answer = [5, 6, 7, 8], [1, 5, 6, 7, 9]
    guesses0 = torch.tensor([[6, 3, 4], [6, 3, 4], [3, 7, 4], [4, 4, 4], [4, 4, 4]])  # top-3 at each row
    hits = ngram_hits(prompt, answer, guesses0)
    # row 0 (root 1): no earlier "1": rank-R guesses 3 / 4 are wrong (target 5).
    # row 1 (root 5): lookup 6 = target, but head 0's top-1 already holds 6: no gain at any width.
    # row 2 (root 6): lookup 7 = target; width 1 (holds 3): gain; width 2 (3, 7): already there.
    # row 3 (root 7): lookup 8 != 9.
    assert hits.tolist() == [1.0, 0.0]


def test_head_accuracy_counts_hits_by_rank():
    class Heads:
        ngrams = draft_vocab = None

        class config:
            num_heads = 2

        def logits(self, hidden, lm_head):
            # Head k at row t ranks token (t + 1 + k) first, then token 99.
            t = hidden.shape[0]
            out = torch.zeros(t, 2, 100)
            for i in range(t):
                for k in range(2):
                    out[i, k, (i + 1 + k) % 100] = 2.0
                    out[i, k, 99] = 1.0
            return out

    future = list(range(10))
    hits = head_accuracy(torch.zeros(10, 4), future, Heads(), None, 2)
    assert hits[0, 0] == 9 and hits[1, 0] == 8 and hits[:, 1].sum() == 0


def test_fit_ngram_weights_picks_the_weight_whose_reranking_gets_most_drafts_accepted():
    import types

    import numpy as np

    from gorgon.speculative.ngram_table import NgramTable
    from gorgon.speculative.tune import AnswerRows, fit_ngram_weights

    # After 2 the answers wrote 6 a hundred times, 7 once; after 1, always 5.
    table = NgramTable.build([[2, 6]] * 100 + [[2, 7]] + [[1, 5]] * 5, min_count=1, weight=1.0)
    V = 12

    class Vocab:  # the drafting vocabulary is every token; "hidden states" are already the logits
        ids_array, index = np.arange(V), np.arange(V)

        def logits(self, states, lm_head):
            return states

    heads = types.SimpleNamespace(ngrams=table, draft_vocab=Vocab(), hidden_states=lambda h: h)
    logits = torch.full((4, 1, V), -5.0)
    logits[0, 0, 7], logits[0, 0, 6] = 3.0, 0.0  # sure of the rare 7: kept only while 3 > 4.6 x weight
    logits[1, 0, 1] = 5.0
    logits[2, 0, 9], logits[2, 0, 5] = 1.0, 0.0  # mildly wrong: the table's 5 wins at any grid weight
    rows = AnswerRows(logits, prompt=[3], answer=[2, 7, 1, 5])
    weight, floor, scores = fit_ngram_weights(heads, None, [rows])
    assert weight == 0.5 and scores[weight, floor] == 3 and scores[1.0, table.floor] == 2
    assert (table.weight, table.floor) == (weight, floor)  # left at the chosen values
    # Ties keep the table's own values.
    table.weight = 0.5
    assert fit_ngram_weights(heads, None, [rows])[:2] == (0.5, floor)


@pytest.mark.parametrize("table", [False, True])
def test_tune_tree_cli_end_to_end(tmp_path, capsys, monkeypatch, table):
    """With an n-gram table in the adapter, guesses come from its drafting vocabulary and the step cost
    is timed through that vocabulary's projection, as the server drafts."""
    from helpers import make_medusa_adapter, save_tiny_checkpoint

    from gorgon.cli import main
    from gorgon.speculative.draft_vocab import DraftVocab
    from gorgon.speculative.ngram_table import NGRAM_FILE, NgramTable

    calls = []
    projection = DraftVocab.logits
    monkeypatch.setattr(
        DraftVocab, "logits", lambda self, *a: calls.append(len(self)) or projection(self, *a)
    )

    model_dir = tmp_path / "model"
    save_tiny_checkpoint(model_dir)
    make_medusa_adapter(tmp_path, "adapter", heads=2)
    if table:
        NgramTable.build([list(range(3, 40))] * 2).save(tmp_path / "adapter" / NGRAM_FILE)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Hello there", "The sky is blue", "Once upon a time"]))
    argv = [
        "tune-tree",
        "--model-id",
        str(model_dir),
        "--dtype",
        "float32",
        "--adapter-id",
        str(tmp_path / "adapter"),
    ]
    argv += ["--prompts-file", str(prompts), "--max-new-tokens", "12", "--max-nodes", "4", "--top-k", "2"]
    assert main(argv) == 0
    tree = CandidateTree.load(str(tmp_path / "adapter" / "gorgon_tree.json"))
    assert 1 <= tree.size <= 4 and tree.depth <= 2
    assert "<- chosen" in capsys.readouterr().out
    assert bool(calls) == table and all(n == 37 for n in calls)  # tokens 3..39
    if table:  # the table's weight and floor refitted on the tuning answers, written with the tree
        from gorgon.speculative.tune import FLOOR_GRID, WEIGHT_GRID

        fitted = NgramTable.load(tmp_path / "adapter" / NGRAM_FILE)
        assert (fitted.weight, fitted.floor) in [
            (0.75, math.log(1e-3)),
            *itertools.product(WEIGHT_GRID, FLOOR_GRID),
        ]
        out = tmp_path / "elsewhere" / "tree.json"
        out.parent.mkdir()
        assert main([*argv, "--output", str(out), "--no-fit-ngram-weights", "--no-prune-nodes"]) == 0
        assert out.exists() and not (out.parent / NGRAM_FILE).exists()
        assert isinstance(json.loads(out.read_text()), list)  # a fixed tree: plain Medusa choices
