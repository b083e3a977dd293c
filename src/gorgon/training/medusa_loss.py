"""The Medusa training loss: which token each head predicts where, weighted cross-entropy through the LM head,
and the per-head statistics (loss, top-1 accuracy, chain acceptance) logged during training and validation.

Head k (0-based) at position t predicts token t+2+k, only where that token is an assistant token: the
reference's `CE(logits_k[:, :-(2+k)], labels[:, 2+k:])` with ignore index -100, heads weighted 0.8^k. Only
positions where at least one head has a label are run through the heads, and only (position, head) pairs
with a label through the LM head: the vocabulary projection is most of the cost. That projection and its
cross-entropy run in chunks whose gradient is computed on the spot, so at most one chunk of logits
([rows, vocab]) exists at a time, whatever the batch.

Self-distillation (`distill` > 0) mixes in the base model's own distribution over the target token as a soft
label: the target t+2+k follows position t+1+k, whose final hidden state is in the same batch, so the
teacher's logits are that hidden state through the same lm_head (the same vocabulary, no extra model pass).
Head k's loss becomes (1 - distill) * CE(target) + distill * CE(teacher distribution): on greedy answers the
hard label is the teacher's argmax, and the soft one adds how close the runners-up were (a data-limited head
overfits less; its probabilities, which the n-gram rerank multiplies, are better calibrated).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gorgon.adapters.medusa import MedusaHeads
from gorgon.training.data import IGNORE_INDEX

HEAD_DECAY = 0.8  # the paper's weight of head k: 0.8^k
LOGIT_CHUNK_ELEMENTS = 1 << 25  # logits per matmul chunk (64 MiB in bf16)
SOFTMAX_SLICE_ELEMENTS = 1 << 20  # logits per softmax slice: 4 MiB of float32, cache-resident

# Rows of the per-sample statistics tensor [B, NUM_STATS, K].
STAT_CE_SUM, STAT_CORRECT, STAT_COUNT, STAT_CHAIN = range(4)
NUM_STATS = 4


def head_targets(labels: torch.Tensor, num_heads: int) -> torch.Tensor:
    """labels [B, T] -> targets [B, T, K]: head k at t predicts labels[:, t+2+k] (ignored past the end)."""
    T = labels.shape[1]
    padded = F.pad(labels, (0, num_heads + 2), value=IGNORE_INDEX)
    return torch.stack([padded[:, 2 + k : 2 + k + T] for k in range(num_heads)], dim=-1)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(x_i W^T, t_i), with the gradients for x (and W when it is trained, v1) computed chunk by
    chunk in the forward pass: the logits are never kept for backward.

    Measured on a 2-core AVX512-BF16 CPU (V=49152, H=576, bf16): the two matmuls cost ~0.3 ms per row and
    are the floor; a float32 softmax over a whole chunk costs another 0.13 ms per row because it does not fit
    in cache, so the softmax runs over slices of ~1M elements and writes the gradient over the logits.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        targets,
        row_weights,
        compute_dtype,
        chunk_rows,
        slice_rows,
        teacher,
        teacher_weight,
        distill,
    ):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        rows = x.shape[0]
        ce = torch.zeros(rows, dtype=torch.float32, device=x.device)
        row_loss = ce if teacher is None else torch.zeros_like(ce)  # what the loss sums (hard CE alone: ce)
        correct = torch.zeros(rows, dtype=torch.bool, device=x.device)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.detach().to(compute_dtype), weight.detach().to(compute_dtype)
            tc = teacher.detach().to(compute_dtype) if teacher is not None else None
            twc = teacher_weight.detach().to(compute_dtype) if teacher is not None else None
            for s in range(0, rows, chunk_rows):
                e = min(s + chunk_rows, rows)
                logits = xc[s:e] @ wc.T  # (c, V) in the compute dtype
                teacher_logits = tc[s:e] @ twc.T if tc is not None else None
                for a in range(0, e - s, slice_rows):
                    b = min(a + slice_rows, e - s)
                    t = targets[s + a : s + b]
                    if teacher_logits is None:
                        p = torch.softmax(logits[a:b], dim=-1, dtype=torch.float32)
                        log_p = None
                    else:  # the soft label's CE needs every log-probability, not only the target's
                        log_p = torch.log_softmax(logits[a:b], dim=-1, dtype=torch.float32)
                        p = log_p.exp()
                    hit = torch.arange(b - a, device=p.device), t
                    ce[s + a : s + b] = -p[hit].clamp_min(1e-30).log() if log_p is None else -log_p[hit]
                    correct[s + a : s + b] = p.argmax(-1) == t
                    if log_p is None:
                        p[hit] -= 1  # d CE / d logits = softmax - onehot
                    else:  # d / d logits = softmax - the mixed target
                        q = torch.softmax(teacher_logits[a:b], dim=-1, dtype=torch.float32)
                        soft = -(q * log_p).sum(-1)
                        row_loss[s + a : s + b] = (1 - distill) * ce[s + a : s + b] + distill * soft
                        p.sub_(q, alpha=distill)
                        p[hit] -= 1 - distill
                    logits[a:b] = p
                # Row weights scale the [c, H] results, not the [c, V] gradient.
                w = row_weights[s:e, None]
                if need_x:
                    grad_x[s:e] = (logits @ wc).float().mul_(w).to(grad_x.dtype)
                if need_w:
                    grad_w += (logits.T @ (xc[s:e].float() * w).to(compute_dtype)).float()
        ctx.save_for_backward(grad_x, grad_w)
        ctx.mark_non_differentiable(ce, correct)
        return (row_loss * row_weights).sum(), ce, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_correct):
        grad_x, grad_w = ctx.saved_tensors
        gx = grad_x * grad_loss.to(grad_x.dtype) if grad_x is not None else None
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gx, gw, None, None, None, None, None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,  # (M, H)
    weight: torch.Tensor,  # (V, H)
    targets: torch.Tensor,  # (M,)
    row_weights: torch.Tensor,  # (M,) float32
    compute_dtype: torch.dtype = torch.float32,
    teacher: torch.Tensor | None = None,  # (M, H)
    teacher_weight: torch.Tensor | None = None,  # (V, H), `weight` when None (v2: the same frozen lm_head)
    distill: float = 0.0,  # the soft label's share of each row's loss (with a teacher)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted loss summed over rows (differentiable: CE, or with a teacher (1 - distill) * CE + distill *
    CE against row i's soft label softmax(teacher[i] @ teacher_weight.T)), per-row hard CE and top-1 hits
    (not differentiable)."""
    vocab = weight.shape[0]
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // (vocab * (2 if teacher is not None else 1)))
    slice_rows = max(1, SOFTMAX_SLICE_ELEMENTS // vocab)
    return _LinearCrossEntropy.apply(
        x,
        weight,
        targets,
        row_weights,
        compute_dtype,
        chunk,
        slice_rows,
        teacher,
        weight if teacher_weight is None else teacher_weight,
        distill,
    )


@dataclass
class MedusaLossOutput:
    loss: torch.Tensor  # scalar: sum_k decay^k * mean loss (CE, or CE mixed with the soft label) of head k
    stats: torch.Tensor  # (B, NUM_STATS, K) float32 per-sample sums (see STAT_*)


def medusa_loss(
    heads: MedusaHeads,
    hidden: torch.Tensor,  # (B, T, H) the base model's final hidden states
    labels: torch.Tensor,  # (B, T) assistant tokens, IGNORE_INDEX elsewhere (and on padding)
    lm_head_weight: torch.Tensor,  # (V, H) the frozen base lm_head (used by v2 heads)
    compute_dtype: torch.dtype = torch.float32,
    decay: float = HEAD_DECAY,
    distill: float = 0.0,  # share of the base model's soft label in each head's loss (see the module doc)
) -> MedusaLossOutput:
    K = heads.config.num_heads
    B = hidden.shape[0]
    targets = head_targets(labels, K)  # (B, T, K)
    valid = targets != IGNORE_INDEX
    b_idx, t_idx = valid.any(-1).nonzero(as_tuple=True)  # positions some head has a label for
    x = hidden[b_idx, t_idx].float()  # (N, H)
    tgt, valid = targets[b_idx, t_idx], valid[b_idx, t_idx]  # (N, K)
    states = heads.hidden_states(x)  # (N, K, H)
    teacher = None
    if distill:  # head k's target at t+2+k is the base model's next token after position t+1+k
        ahead = t_idx[:, None] + 1 + torch.arange(K, device=x.device)  # (N, K)
        teacher = hidden[b_idx[:, None], ahead.clamp_max(hidden.shape[1] - 1)].float()  # (N, K, H)

    counts = valid.sum(0)  # (K,)
    head_w = decay ** torch.arange(K, device=x.device, dtype=torch.float32) / counts.clamp_min(1)
    ce = torch.zeros(valid.shape, dtype=torch.float32, device=x.device)
    correct = torch.zeros(valid.shape, dtype=torch.bool, device=x.device)
    if heads.has_own_lm_heads:  # v1: each head through its own (trained) LM head
        loss = x.new_zeros(())
        for k, lm in enumerate(heads.lm_heads):
            rows = valid[:, k].nonzero(as_tuple=True)[0]
            w = head_w[k].expand(rows.shape[0])
            part, ce_k, hit_k = linear_cross_entropy(
                states[rows, k],
                lm.weight,
                tgt[rows, k],
                w,
                compute_dtype,
                teacher[rows, k] if teacher is not None else None,
                lm_head_weight,
                distill,
            )
            loss = loss + part
            ce[rows, k], correct[rows, k] = ce_k, hit_k
    else:  # v2: every labelled (position, head) pair through the frozen base lm_head at once
        rows, ks = valid.nonzero(as_tuple=True)
        loss, ce_p, hit_p = linear_cross_entropy(
            states[rows, ks],
            lm_head_weight,
            tgt[rows, ks],
            head_w[ks],
            compute_dtype,
            teacher[rows, ks] if teacher is not None else None,
            None,
            distill,
        )
        ce[rows, ks], correct[rows, ks] = ce_p, hit_p

    # A chain draft of depth k+1 is accepted (teacher forced) where heads 0..k are all right.
    chain = (correct & valid).long().cumprod(dim=-1).bool() & valid[:, :1]
    per_pos = torch.stack([ce, correct.float(), valid.float(), chain.float()], dim=1)  # (N, NUM_STATS, K)
    stats = torch.zeros(B, NUM_STATS, K, dtype=torch.float32, device=x.device)
    stats.index_add_(0, b_idx, per_pos.detach())
    return MedusaLossOutput(loss, stats)


def summarize(stats: torch.Tensor) -> dict[str, float]:
    """Per-head mean loss and top-1 accuracy, and the mean number of chain-draft tokens accepted per step
    (teacher forced: where heads 0..k all hit, a chain of depth k+1 is accepted), from summed statistics
    [..., NUM_STATS, K]."""
    totals = stats.reshape(-1, NUM_STATS, stats.shape[-1]).sum(0).double()
    count = totals[STAT_COUNT].clamp_min(1)
    out: dict[str, float] = {}
    for k in range(totals.shape[-1]):
        out[f"head{k}_loss"] = float(totals[STAT_CE_SUM, k] / count[k])
        out[f"head{k}_top1"] = float(totals[STAT_CORRECT, k] / count[k])
    out["accepted_per_step"] = float(totals[STAT_CHAIN].sum() / count[0])
    return out
