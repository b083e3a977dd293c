import math
import types

import pytest
import torch

from gorgon.engine.speculation import Speculator, load_ngram_table
from gorgon.speculative.ngram_table import FLOOR, NGRAM_FILE, NgramTable
from gorgon.speculative.tree import CandidateTree


def test_counts_by_longest_context_with_masks_and_min_count():
    seq = [1, 2, 3, 1, 2, 4, 1, 2, 3]
    table = NgramTable.build([seq], min_count=2)
    tokens, logprobs = table.lookup([9, 1, 2])  # (9, 1, 2) unseen: backs off to (1, 2)
    assert tokens.tolist() == [3, 4]
    assert logprobs.astype(float).tolist() == pytest.approx([math.log(2 / 3), math.log(1 / 3)], abs=1e-3)
    assert table.lookup([3, 1, 2])[0].tolist() == [3, 4]  # "3 1 2" was seen once: backs off to "1 2"
    assert NgramTable.build([seq], min_count=1).lookup([3, 1, 2])[0].tolist() == [4]  # the longest wins
    assert table.lookup([7]) is None  # never seen
    assert table.lookup([2, 4]) is None  # "2 4" and "4" were each seen once: below min_count
    assert NgramTable.build([seq], min_count=1).lookup([2, 4])[0].tolist() == [1]
    # Masked-out positions are not counted as next tokens (here: only the last token is a target).
    masked = NgramTable.build([seq], [[False] * 8 + [True]], min_count=1)
    assert masked.lookup([1, 2])[0].tolist() == [3] and masked.lookup([1, 2])[1].tolist() == [0.0]
    assert masked.lookup([3, 1]) is None


def test_save_load_round_trip_and_refuses_malformed_files(tmp_path):
    table = NgramTable.build([[5, 6, 7, 5, 6, 8, 5, 6, 7]], min_count=1, weight=0.5)
    assert table.floor == FLOOR
    table.floor = -9.25
    table.save(tmp_path / NGRAM_FILE)
    loaded = NgramTable.load(tmp_path / NGRAM_FILE)
    assert loaded.weight == 0.5 and loaded.floor == -9.25
    assert len(loaded) == len(table) and loaded.max_token() == 8
    for ctx in ([5, 6], [7, 5, 6], [6], [1]):
        a, b = table.lookup(ctx), loaded.lookup(ctx)
        assert (a is None and b is None) or (
            a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()
        )

    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(2)}, str(bad), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a Gorgon n-gram table"):
        NgramTable.load(bad)
    o = table.orders[1]
    broken = {
        "order1.keys": torch.from_numpy(o.keys),
        "order1.offsets": torch.from_numpy(o.offsets + 1),  # points past the entries
        "order1.tokens": torch.from_numpy(o.tokens),
        "order1.logprobs": torch.from_numpy(o.logprobs),
    }
    save_file(broken, str(bad), metadata={"format": "gorgon-ngrams-v1"})
    with pytest.raises(ValueError, match="malformed"):
        NgramTable.load(bad)
    meta = {"format": "gorgon-ngrams-v1", "weight": "0.5"}  # a table written before floors were stored
    good = {**broken, "order1.offsets": torch.from_numpy(o.offsets)}
    save_file(good, str(bad), metadata=meta)
    assert NgramTable.load(bad).floor == FLOOR
    save_file(good, str(bad), metadata={**meta, "floor": "nan"})
    with pytest.raises(ValueError, match="finite"):
        NgramTable.load(bad)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / NGRAM_FILE).write_bytes(b"not safetensors at all")
    assert load_ngram_table(tmp_path / "junk", vocab_size=100) is None  # ignored, heads still served
    assert load_ngram_table(tmp_path, vocab_size=8) is None  # proposes token 8: outside a 8-token vocab
    served = load_ngram_table(tmp_path, vocab_size=9)
    assert served is not None and set(served._rows) == set(served.orders)  # indexed at load, not mid-request
    assert load_ngram_table(tmp_path / "nothing", vocab_size=9) is None


def test_a_table_built_for_a_vocabulary_drafts_from_it_only(tmp_path):
    # After 5: 6 three times, 7 twice, 9 once; 7 is outside the vocabulary.
    seqs = [[5, 6]] * 3 + [[5, 7]] * 2 + [[5, 9]]
    table = NgramTable.build(seqs, min_count=1, vocab=[9, 6, 5, 6])
    assert table.vocabulary().tolist() == [5, 6, 9] and table.max_token() == 9
    tokens, logprobs = table.lookup([5])
    assert tokens.tolist() == [6, 9]  # 7 left out, ...
    assert logprobs.tolist() == pytest.approx([math.log(3 / 6), math.log(1 / 6)], abs=1e-3)  # ...but counted
    table.save(tmp_path / NGRAM_FILE)
    assert NgramTable.load(tmp_path / NGRAM_FILE).vocabulary().tolist() == [5, 6, 9]
    assert NgramTable.build(seqs, min_count=1).vocabulary().tolist() == [5, 6, 7, 9]  # all it knows
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / NGRAM_FILE))
    tensors["vocab"] = torch.tensor([6, 5], dtype=torch.long)  # not sorted
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"format": "gorgon-ngrams-v1"})
    with pytest.raises(ValueError, match="vocabulary"):
        NgramTable.load(tmp_path / "bad.safetensors")


def test_rank_combines_heads_and_table_and_conditions_deeper_heads_on_the_best_guess():
    # After "1 2" the answers always continued with 7; after "2 7", with 9.
    table = NgramTable.build([[1, 2, 7, 9]] * 3, min_count=1, weight=1.0)
    logits = torch.full((2, 12), -5.0)
    logits[0, 3], logits[0, 7] = 2.0, 1.0  # head 0 prefers 3, then 7
    logits[1, 4], logits[1, 9] = 2.0, 0.5  # head 1 prefers 4, then 9
    ranked = table.rank(logits, [1, 2], top_k=2)
    assert ranked[0] == [7, 3]  # the table's certainty about 7 outweighs the head's mild preference for 3
    assert ranked[1] == [9, 4]  # depth 2 reads "2 7" (the best depth-1 guess): 9
    # A context the table does not know: the heads' own order.
    assert table.rank(logits, [5], top_k=2) == [[3, 7], [4, 9]]
    # A head that is sure of itself keeps its guess.
    logits[0, 3] = 20.0
    assert table.rank(logits, [1, 2], top_k=1)[0] == [3]


def test_rank_scored_gives_head_log_probabilities_plus_weighted_table_log_frequencies():
    table = NgramTable.build([[1, 2, 7, 9]] * 3, min_count=1, weight=1.5)
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(0))
    logits[0, 3] = 3.0
    head_lp = torch.log_softmax(logits, dim=-1)
    ranked, scores = table.rank_scored(logits, [1, 2], top_k=3)
    assert ranked == table.rank(logits, [1, 2], top_k=3)  # the same order as the server's ranking
    after_12, _ = table.lookup([1, 2])
    for depth, (tokens, row) in enumerate(zip(ranked, scores)):
        context = [1, 2, *[r[0] for r in ranked[:depth]]]
        known = dict(zip(*[a.tolist() for a in table.lookup(context)]))
        for token, score in zip(tokens, row):
            table_lp = known.get(token, table.floor)
            assert score == pytest.approx(float(head_lp[depth, token]) + 1.5 * table_lp, abs=1e-4)
    assert after_12.tolist() == [7]
    # Contexts the table does not know ("5", then "5 3"): the heads' own log-probabilities.
    ranked, scores = table.rank_scored(logits, [5], top_k=2)
    want = head_lp.topk(2, dim=-1)
    assert ranked == want.indices.tolist() and ranked[0][0] == 3
    assert [x for row in scores for x in row] == pytest.approx(want.values.flatten().tolist(), abs=1e-5)


def test_speculator_drafts_with_the_table_of_the_sequences_heads():
    table = NgramTable.build([[1, 2, 7]] * 3, min_count=1, weight=1.0)
    heads = types.SimpleNamespace(ngrams=table)
    spec = Speculator.__new__(Speculator)
    spec.tree, spec.ngram_nodes, spec.heads = CandidateTree.load("chain-1"), (), heads
    logits = torch.zeros(1, 12)
    logits[0, 3] = 1.0
    seq = types.SimpleNamespace(token_ids=[1, 2], medusa=None)
    assert spec.tree_from_logits(logits, seq) == [7]
    own = types.SimpleNamespace(ngrams=None)  # a request's own heads without a table: plain ranking
    assert spec.tree_from_logits(logits, types.SimpleNamespace(token_ids=[1, 2], medusa=own)) == [3]


def test_tune_tree_ranks_guesses_as_the_server_does():
    from gorgon.speculative.tune import head_guesses

    table = NgramTable.build([[1, 2, 7, 9]] * 3, min_count=1, weight=1.0)
    logits = torch.full((3, 2, 12), -5.0)
    logits[:, 0, 3], logits[:, 0, 7] = 2.0, 1.0

    class Heads:
        ngrams = table
        draft_vocab = None

        def logits(self, hidden, lm_head):
            return logits

    contexts = [[1, 2], [5], [2]]
    guesses = head_guesses(torch.zeros(3, 4), Heads(), None, 2, contexts)
    assert guesses.shape == (3, 2, 2)
    assert guesses[:, 0].tolist() == [[7, 3], [3, 7], [7, 3]]  # "2" alone is followed by 7 too
    Heads.ngrams = None
    assert head_guesses(torch.zeros(3, 4), Heads(), None, 2, contexts)[:, 0].tolist() == [[3, 7]] * 3
