"""Training data and loss: assistant-only masks from the chat template, each head's shifted targets, and the
chunked loss against a brute-force computation over full logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gorgon.adapters.medusa import MedusaConfig, MedusaHeads
from gorgon.training import medusa_loss as ml
from gorgon.training.data import (
    IGNORE_INDEX,
    load_message_lists,
    load_message_lists_from,
    tokenize_conversation,
    tokenize_conversations,
)
from gorgon.training.medusa_loss import head_targets, linear_cross_entropy, medusa_loss, summarize

X = IGNORE_INDEX

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello world"},
    {"role": "assistant", "content": "The quick brown fox."},
    {"role": "user", "content": "How are you today?"},
    {"role": "assistant", "content": "Once upon a time"},
]


def test_assistant_mask_covers_answers_and_their_end_of_turn_only(tiny_tokenizer):
    item, cut = tokenize_conversation(tiny_tokenizer, CONV, max_length=1000)
    assert not cut
    text = tiny_tokenizer.apply_chat_template(CONV, tokenize=False)
    assert list(item.input_ids) == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    # The masked runs, decoded, are exactly each answer plus the EOS the template closes it with.
    runs, run = [], []
    for tok, m in zip(item.input_ids, item.assistant_mask):
        if m:
            run.append(tok)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    eos = tiny_tokenizer.eos_token
    assert [tiny_tokenizer.decode(r) for r in runs] == [
        f"The quick brown fox.{eos}",
        f"Once upon a time{eos}",
    ]
    assert item.labels == [t if m else X for t, m in zip(item.input_ids, item.assistant_mask)]


def test_truncation_and_skips(tiny_tokenizer):
    full, _ = tokenize_conversation(tiny_tokenizer, CONV, max_length=1000)
    cut, was_cut = tokenize_conversation(tiny_tokenizer, CONV, max_length=len(full.input_ids) - 3)
    assert was_cut and cut.input_ids == full.input_ids[:-3] and cut.assistant_mask == full.assistant_mask[:-3]
    data = tokenize_conversations(
        tiny_tokenizer, [CONV, [{"role": "user", "content": "no answer"}], CONV[:3]], max_length=1000
    )
    assert len(data.items) == 2 and data.skipped["no assistant turn"] == 1
    with pytest.raises(ValueError, match="No conversation has assistant tokens"):
        tokenize_conversations(tiny_tokenizer, [CONV], max_length=5)


def test_reads_message_lists_and_sharegpt(tmp_path):
    path = tmp_path / "d.json"
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path.write_text(json.dumps([CONV, sharegpt, CONV, {"bad": 1}]))
    convs = load_message_lists(path)
    assert len(convs) == 3  # repeated conversations are kept (distinct answers are distinct data)
    assert convs[1] == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})
    other = tmp_path / "e.jsonl"
    other.write_text(json.dumps(sharegpt) + "\n")
    both = load_message_lists_from(f"{path}, {other}")  # --data_path A,B trains on both, in order
    assert both == convs + load_message_lists(other) and len(both) == 4


def test_head_targets_by_hand():
    labels = torch.tensor([[X, X, 5, 6, 7, X, 8]])
    t = head_targets(labels, 2)
    # head 0 at position t predicts token t+2, head 1 token t+3
    assert t[0, :, 0].tolist() == [5, 6, 7, X, 8, X, X]
    assert t[0, :, 1].tolist() == [6, 7, X, 8, X, X, X]


def test_linear_cross_entropy_matches_autograd(monkeypatch):
    monkeypatch.setattr(ml, "LOGIT_CHUNK_ELEMENTS", 500)  # several chunks and softmax slices
    monkeypatch.setattr(ml, "SOFTMAX_SLICE_ELEMENTS", 120)
    torch.manual_seed(0)
    x = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t, rw = torch.randint(0, 50, (37,)), torch.rand(37)
    loss, ce, hit = linear_cross_entropy(x, w, t, rw)
    gx, gw = torch.autograd.grad(loss, (x, w))
    logits = x @ w.T
    ref_ce = F.cross_entropy(logits, t, reduction="none")
    rx, rw_ = torch.autograd.grad((ref_ce * rw).sum(), (x, w))
    torch.testing.assert_close(loss, (ref_ce * rw).sum())
    torch.testing.assert_close(ce, ref_ce.detach())
    assert torch.equal(hit, logits.argmax(-1) == t)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw_)


@pytest.mark.parametrize("distill", [0.4, 1.0])
def test_linear_cross_entropy_with_a_teacher_matches_autograd(monkeypatch, distill):
    monkeypatch.setattr(ml, "LOGIT_CHUNK_ELEMENTS", 500)
    monkeypatch.setattr(ml, "SOFTMAX_SLICE_ELEMENTS", 120)
    torch.manual_seed(1)
    x = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    teacher, teacher_w = torch.randn(37, 16), torch.randn(50, 16)
    t, rw = torch.randint(0, 50, (37,)), torch.rand(37)
    loss, ce, hit = linear_cross_entropy(x, w, t, rw, torch.float32, teacher, teacher_w, distill)
    gx, gw = torch.autograd.grad(loss, (x, w))
    logits = x @ w.T
    hard = F.cross_entropy(logits, t, reduction="none")
    soft = -(torch.softmax(teacher @ teacher_w.T, -1) * torch.log_softmax(logits, -1)).sum(-1)
    ref = (((1 - distill) * hard + distill * soft) * rw).sum()
    rx, rw_ = torch.autograd.grad(ref, (x, w))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(ce, hard.detach())  # the per-row figure stays the hard CE (logged)
    assert torch.equal(hit, logits.argmax(-1) == t)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw_)


def _brute_force(heads, hidden, labels, lm_weight, decay=0.8, distill=0.0):
    """The reference recipe over full logits: CE(logits_k[:, :-(2+k)], labels[:, 2+k:]), weights decay^k;
    with `distill`, mixed with CE against the base distribution lm_head(hidden[:, 1+k:-1]) over each target."""
    lm = torch.nn.Linear(hidden.shape[-1], lm_weight.shape[0], bias=False)
    lm.weight = torch.nn.Parameter(lm_weight, requires_grad=False)
    logits = heads.logits(hidden, lm)  # (B, T, K, V)
    targets = head_targets(labels, heads.config.num_heads)
    hits = (logits.argmax(-1) == targets) & (targets != X)
    accepted = [
        next((k for k, h in enumerate(row) if not h), len(row))  # leading hits: the chain draft accepted
        for b in range(labels.shape[0])
        for t, row in enumerate(hits[b].tolist())
        if targets[b, t, 0] != X
    ]
    loss, per_head = 0.0, []
    for k in range(heads.config.num_heads):
        lk = logits[:, : -(2 + k), k].reshape(-1, logits.shape[-1])
        yk = labels[:, 2 + k :].reshape(-1)
        loss_k = F.cross_entropy(lk, yk, ignore_index=X)
        keep = yk != X
        per_head.append((loss_k.item(), (lk[keep].argmax(-1) == yk[keep]).float().mean().item()))
        if distill:
            base = torch.softmax(hidden[:, 1 + k : -1] @ lm_weight.T, -1).reshape(-1, lm_weight.shape[0])
            soft = -(base * torch.log_softmax(lk, -1)).sum(-1)[keep].mean()
            loss_k = (1 - distill) * loss_k + distill * soft
        loss = loss + decay**k * loss_k
    return loss, per_head, sum(accepted) / len(accepted)


@pytest.mark.parametrize("version, layers, distill", [(2, 1, 0.0), (1, 2, 0.0), (2, 1, 0.5), (1, 2, 0.5)])
def test_medusa_loss_matches_the_reference_recipe(version, layers, distill):
    torch.manual_seed(0)
    B, T, H, V, K = 3, 30, 16, 6, 3  # a small vocabulary: many hits, so chains of hits occur
    cfg = MedusaConfig(num_heads=K, num_layers=layers, version=version, hidden_size=H, vocab_size=V)
    lm_weight = torch.randn(V, H)
    heads = MedusaHeads.init_for_training(cfg, lm_weight)
    with torch.no_grad():  # away from the identity start, so every part of the heads matters
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hidden = torch.randn(B, T, H)
    labels = torch.randint(0, V, (B, T))
    labels[0, :5] = X  # a prompt
    labels[1, 3:8] = X  # a user turn between two answers
    labels[2, 9:] = X  # padding
    out = medusa_loss(heads, hidden, labels, lm_weight, distill=distill)
    grads = torch.autograd.grad(out.loss, list(heads.parameters()))
    ref, per_head, accepted = _brute_force(heads, hidden, labels, lm_weight, distill=distill)
    ref_grads = torch.autograd.grad(ref, list(heads.parameters()))
    torch.testing.assert_close(out.loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    summary = summarize(out.stats)
    for k, (loss_k, top1_k) in enumerate(per_head):
        assert summary[f"head{k}_loss"] == pytest.approx(loss_k, rel=1e-5)
        assert summary[f"head{k}_top1"] == pytest.approx(top1_k)
    assert accepted > 0.1 and summary["accepted_per_step"] == pytest.approx(accepted)
    assert out.stats.shape == (B, ml.NUM_STATS, K)
    # Per-sample counts: sample 2 has labels at 0..8, so head k has 9-2-k targets.
    assert out.stats[2, ml.STAT_COUNT].tolist() == [7, 6, 5]


def test_ngram_table_of_a_dataset_counts_assistant_tokens_only(tmp_path, tiny_tokenizer, monkeypatch):
    from types import SimpleNamespace

    from gorgon.models import loader
    from gorgon.speculative.ngram_table import NGRAM_FILE, NgramTable
    from gorgon.training import ngrams

    path = tmp_path / "d.json"
    path.write_text(json.dumps([CONV] * 2))
    table = ngrams.build_table(tiny_tokenizer, str(path), max_length=1000)
    data = tokenize_conversations(tiny_tokenizer, [CONV], max_length=1000).items[0]
    first = data.assistant_mask.index(True)
    # The first answer token follows the prompt's last tokens; no prompt-only token is ever a continuation.
    assert data.input_ids[first] in table.lookup(list(data.input_ids[:first]))[0].tolist()
    prompt_only = set(data.input_ids[:first]) - set(data.input_ids[first:])
    assert not any(set(o.tokens.tolist()) & prompt_only for o in table.orders.values())
    # The command writes the table into an adapter directory.
    out = tmp_path / "adapter"
    out.mkdir()
    monkeypatch.setattr(
        loader, "resolve_checkpoint", lambda model_id: SimpleNamespace(tokenizer=tiny_tokenizer)
    )
    ngrams.main(["--data_path", str(path), "--output_dir", str(out), "--min_count", "1"])
    assert len(NgramTable.load(out / NGRAM_FILE)) >= len(table) > 0
    # Rebuilt from more answers, keeping the drafting vocabulary (and weight, floor) the heads were trained on.
    written = NgramTable.load(out / NGRAM_FILE)
    written.vocab, written.weight, written.floor = written.vocabulary()[::2].copy(), 1.25, -9.0
    written.save(out / NGRAM_FILE)
    more = tmp_path / "more.json"
    more.write_text(json.dumps([CONV] * 2 + [[CONV[0], {"role": "assistant", "content": "Other words."}]]))
    ngrams.main(["--data_path", str(more), "--output_dir", str(out), "--min_count", "1", "--keep_vocabulary"])
    rebuilt = NgramTable.load(out / NGRAM_FILE)
    assert rebuilt.vocabulary().tolist() == written.vocab.tolist()
    assert (rebuilt.weight, rebuilt.floor) == (1.25, -9.0)
    assert set(np.concatenate([o.tokens for o in rebuilt.orders.values()]).tolist()) <= set(
        written.vocab.tolist()
    )
