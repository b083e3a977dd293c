"""Turns a `StepPlan` into tensors, runs the model once, and returns the logits the plan asked for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gorgon.engine.kv_cache import SCRATCH_SLOT, KVCache
from gorgon.engine.scheduler import StepPlan
from gorgon.kernels.linear import InvariantLinear, row_multiple
from gorgon.models.attention import AttentionMetadata
from gorgon.models.attention import kernel_available as attention_kernel_available
from gorgon.models.llama import LlamaModel
from gorgon.models.lora_batch import LoraBatch
from gorgon.speculative.draft_vocab import DraftVocab
from gorgon.speculative.tree import CandidateTree


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


@dataclass
class DraftLogits:
    logits: torch.Tensor  # [rows it may draft from, depth, V] float32 speculative logits
    vocab: DraftVocab | None = None  # V = its tokens when given, else the whole vocabulary


@dataclass
class StepOutput:
    logits: list[torch.Tensor]  # per chunk, [rows, vocab] float32
    hidden: list[torch.Tensor]  # per chunk, the same rows' final hidden states (what feeds lm_head)
    draft_logits: list[DraftLogits | None] | None = None  # per chunk with draft heads, else None


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        cache: KVCache,
        dtype: torch.dtype,
        device: torch.device,
        batch_invariant: bool = True,
        tree: CandidateTree | None = None,
    ) -> None:
        self.model = model
        self.tree = tree
        self.cache = cache
        self.device = device
        self.dtype = dtype
        self._last_lora: LoraBatch | None = None  # its kernel arguments serve the next step's same adapters
        # Without batch invariance (only to measure what it costs): plain BLAS, no row padding.
        self.rows = row_multiple(dtype, device) if batch_invariant else 1
        # Attention, rotary and norm kernels need a float32 or bfloat16 cache and a bfloat16/float32 model.
        self.attention_kernel = (
            batch_invariant
            and dtype in (torch.bfloat16, torch.float32)
            and attention_kernel_available(cache.layers[0][0].dtype, device)
            and model.config.head_dim % 16 == 0  # the kernel's vector width
        )
        for module in model.modules():
            if isinstance(module, InvariantLinear):
                module.use_kernel = batch_invariant

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> StepOutput:
        """Returns, per chunk, float32 logits [rows, vocab] and the final hidden states of those rows: every
        row (prompt logprobs, or a verified candidate tree: row 0 the chunk's token, row i + 1 node i) or only
        the last."""
        ids, positions, write_slots, logit_rows = [], [], [], []
        table_rows, table_pos, tables = [], [], []  # attention: one entry per sequence, or per tree node
        table_group = []  # per table, the chunk's own table: a tree's tables share its key prefix
        row = 0
        for chunk in plan.chunks:
            n = len(chunk.tokens)
            ids += chunk.tokens
            positions += range(chunk.start, chunk.end)
            write_slots += chunk.seq.slots[chunk.start : chunk.end]
            table_rows.append(list(range(row, row + n)))
            table_pos.append(list(range(chunk.start, chunk.end)))
            group = len(tables)
            tables.append(chunk.seq.slots[: chunk.end])
            logit_rows.append(list(range(row, row + n)) if chunk.want_all_logits else [row + n - 1])
            row += n
            if chunk.draft:
                row = self._add_tree_rows(
                    chunk, row, ids, positions, write_slots, table_rows, table_pos, tables
                )
                logit_rows[-1] += list(range(logit_rows[-1][-1] + 1, row))
            table_group += [group] * (len(tables) - len(table_group))

        total = _round_up(row, self.rows)
        pad = total - row
        meta = self._metadata(table_rows, table_pos, tables, write_slots + [SCRATCH_SLOT] * pad, table_group)
        dev = self.device
        input_ids = torch.tensor(ids + [0] * pad, dtype=torch.long, device=dev)
        pos = torch.tensor(positions + [0] * pad, dtype=torch.long, device=dev)
        lora = self._lora_batch(plan, total)
        hidden = self.model(input_ids, pos, self.cache.layers, meta, lora)

        flat_rows = [r for rows in logit_rows for r in rows]
        n_logits = len(flat_rows)
        selected = hidden[torch.tensor(flat_rows, device=dev)]
        sizes = [len(r) for r in logit_rows]
        draft_logits: list[DraftLogits | None] = [None] * len(plan.chunks)
        head_rows, spans, vocab_groups = self._draft_head_rows(plan, selected, sizes)
        lm_input = torch.cat([selected, *head_rows]) if head_rows else selected
        total_rows = lm_input.shape[0]
        pad_rows = _round_up(total_rows, self.rows) - total_rows
        if pad_rows:
            lm_input = torch.cat([lm_input, lm_input.new_zeros(pad_rows, lm_input.shape[1])])
        # The default heads' drafting vocabulary and no LoRA (the common case): its rows share the lm_head's
        # weight pass. Other vocabularies (per-request heads) take a call of their own.
        joint = (
            next((g for g in vocab_groups if self._vocab_of(plan, g).joint_pass), None)
            if lora is None
            else None
        )
        vocab_groups = [g for g in vocab_groups if g is not joint]
        for members in vocab_groups:
            self._vocab_logits(plan, members, draft_logits)
        if lora is not None:  # sampled rows, then Medusa head rows: each with its request's LoRA
            head_adapters = [c.seq.lora for c, n in zip(plan.chunks, sizes) for _ in range(n)]
            head_adapters += [plan.chunks[i].seq.lora for i, _, r, d in spans for _ in range(r * d)]
            lora.set_head_rows(head_adapters + [None] * pad_rows)
        if joint is None:
            all_logits = self.model.logits(lm_input, lora)
        else:
            all_logits = self._vocab_logits(plan, joint, draft_logits, lm_input)
        for index, start, rows, depth in spans:
            draft_logits[index] = DraftLogits(all_logits[start : start + rows * depth].view(rows, depth, -1))
        logits = all_logits[:n_logits]
        return StepOutput(list(logits.split(sizes)), list(selected.split(sizes)), draft_logits)

    def _lora_batch(self, plan: StepPlan, total_rows: int) -> LoraBatch | None:
        """Each flat row's LoRA adapter (its request's; tree rows too), or None when the step has none."""
        if all(chunk.seq.lora is None for chunk in plan.chunks):
            self._last_lora = None
            return None
        adapters = []
        for chunk in plan.chunks:
            adapters += [chunk.seq.lora] * (len(chunk.tokens) + len(chunk.draft or ()))
        adapters += [None] * (total_rows - len(adapters))
        lora = LoraBatch.build(adapters, self.dtype, self.device, use_kernel=self.attention_kernel)
        lora.reuse(self._last_lora)
        self._last_lora = lora
        return lora

    def _draft_head_rows(self, plan: StepPlan, selected: torch.Tensor, sizes: list[int]):
        """Medusa v2 heads' hidden states for the rows a chunk may draft from (every verified row, since the
        accepted one is not known yet; else the last). Returns (states to run through the step's one
        lm_head call, with their spans: the v2 form, base and speculative logits from a single projection;
        per drafting vocabulary, its chunks' (index, states), for heads that draft from one). A request
        whose LoRA adapter changes lm_head drafts through the lm_head call, so the adapter shapes its
        drafts as it shapes its tokens."""
        head_rows, spans = [], []
        by_vocab: dict[int, list[tuple[int, torch.Tensor]]] = {}
        start, offset = sum(sizes), 0
        for index, (chunk, size) in enumerate(zip(plan.chunks, sizes)):
            rows = selected[offset : offset + size]
            offset += size
            heads = chunk.draft_heads
            if heads is None or self.tree is None:
                continue
            rows = rows if chunk.draft else rows[-1:]
            states = heads.hidden_states(rows)[:, : self.tree.depth]  # (r, depth, H)
            lora = chunk.seq.lora
            if heads.draft_vocab is not None and (lora is None or lora.lm_head is None):
                by_vocab.setdefault(id(heads.draft_vocab), []).append((index, states))
                continue
            head_rows.append(states.reshape(-1, states.shape[-1]))
            spans.append((index, start, rows.shape[0], self.tree.depth))
            start += rows.shape[0] * self.tree.depth
        return head_rows, spans, list(by_vocab.values())

    def _vocab_logits(self, plan: StepPlan, members: list, out: list, lm_input: torch.Tensor | None = None):
        """The drafting vocabulary's logits of `members` (chunk index, head states) into `out`. With
        `lm_input`, in one weight pass with the lm_head's logits of those rows, which it returns."""
        vocab = self._vocab_of(plan, members)
        flat = torch.cat([states.reshape(-1, states.shape[-1]) for _, states in members])
        if lm_input is None:
            logits, full = vocab.logits(flat, self.model.lm_head), None
        else:
            full, logits = vocab.joint_logits(lm_input, flat, self.model.lm_head)
        for (index, states), part in zip(
            members, logits.split([s.shape[0] * s.shape[1] for _, s in members])
        ):
            out[index] = DraftLogits(part.view(states.shape[0], states.shape[1], -1), vocab)
        return full

    @staticmethod
    def _vocab_of(plan: StepPlan, members: list):
        return plan.chunks[members[0][0]].draft_heads.draft_vocab

    def _add_tree_rows(self, chunk, row, ids, positions, write_slots, table_rows, table_pos, tables) -> int:
        """Rows for the chunk's candidate tree: node i at position root + depth, in the sequence's scratch slot
        i, attending to the prefix, the root and its ancestors in position order (what plain decoding of
        that path would see), each through a slot table of its own."""
        tree, seq, root = self.tree, chunk.seq, chunk.start
        prefix = seq.slots[: root + 1]
        for i, token in enumerate(chunk.draft):
            chain = tree.ancestors[i]
            ids.append(token)
            positions.append(root + len(chain))
            write_slots.append(seq.node_slots[i])
            table_rows.append([row])
            table_pos.append([root + len(chain)])
            tables.append(prefix + [seq.node_slots[a] for a in chain])
            row += 1
        return row

    def _metadata(self, table_rows, table_pos, tables, write_slots, groups=None) -> AttentionMetadata:
        cfg = self.model.config
        return AttentionMetadata.build(
            table_rows,
            table_pos,
            tables,
            write_slots,
            heads_per_kv=cfg.num_heads // cfg.num_kv_heads,
            sliding_window=cfg.sliding_window,
            use_kernel=self.attention_kernel,
            device=self.device,
            seq_group=groups,
        )


@torch.inference_mode()
def time_forward(
    runner: ModelRunner,
    rows: int,
    repeats: int = 3,
    context: int = 256,
    head_depth: int = 0,
    vocab: DraftVocab | None = None,
    shared: bool = False,
) -> float:
    """Seconds for one step of `rows` decode rows (each over `context` keys) with their logits, and
    `head_depth` more lm_head rows per row (Medusa heads drafting from every verified row; through the
    drafting vocabulary's projection when given, as the runner does): what a verification of that many
    rows costs. `shared`: the rows are one sequence's candidate tree (attention reads their common keys
    once, as it does for a tree); else each row is a sequence of its own. Reads and writes only the
    scratch slot."""
    import time

    total = _round_up(rows, runner.rows)
    meta = runner._metadata(
        [[r] for r in range(rows)],
        [[context - 1] for _ in range(rows)],
        [[SCRATCH_SLOT] * context for _ in range(rows)],
        [SCRATCH_SLOT] * total,
        [0] * rows if shared else None,
    )
    ids = torch.zeros(total, dtype=torch.long, device=runner.device)
    pos = torch.full((total,), context - 1, dtype=torch.long, device=runner.device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up (weight packing, allocator)
        start = time.perf_counter()
        hidden = runner.model(ids, pos, runner.cache.layers, meta)
        if vocab is None:
            runner.model.logits(hidden[:rows].repeat(1 + head_depth, 1))
        elif head_depth:  # as the runner: the heads' rows share the lm_head's pass
            vocab.joint_logits(hidden[:rows], hidden[:rows].repeat(head_depth, 1), runner.model.lm_head)
        else:
            runner.model.logits(hidden[:rows])
        best = min(best, time.perf_counter() - start)
    return best
