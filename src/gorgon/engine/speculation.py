"""Medusa drafting inside the engine: heads -> candidate tree tokens, the policy that decides whether a step
speculates, and the counters behind the speculation metrics."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

from gorgon.config import SpeculationConfig
from gorgon.engine.step_times import StepTimes
from gorgon.kernels.topk import top_k
from gorgon.speculative.tree import BUILTIN_TREES, CandidateTree

log = logging.getLogger(__name__)


@dataclass
class SpeculationStats:
    steps_on: int = 0  # decode steps that verified drafts
    steps_off: int = 0  # decode steps the policy ran without drafts
    verified_sequences: int = 0  # sequence-steps that verified a tree
    emitted_tokens: int = 0  # tokens emitted by those sequence-steps
    accepted_per_depth: list[int] = field(default_factory=list)  # accepted nodes at depth k + 1 (head k)

    def record(self, accepted: int) -> None:
        self.verified_sequences += 1
        self.emitted_tokens += accepted + 1
        for depth in range(accepted):
            self.accepted_per_depth[depth] += 1

    @property
    def mean_tokens_per_step(self) -> float:
        return self.emitted_tokens / self.verified_sequences if self.verified_sequences else 0.0

    def head_acceptance(self) -> list[float]:
        n = max(self.verified_sequences, 1)
        return [a / n for a in self.accepted_per_depth]


PRIOR_TOKENS_PER_STEP = 1.5  # until measured: what a modest adapter achieves


@dataclass(frozen=True)
class StepCost:
    """Step time as a function of rows, piecewise linear between measured points."""

    rows: tuple[int, ...]
    seconds_at: tuple[float, ...]

    @classmethod
    def measure(cls, runner, max_rows: int) -> StepCost:
        from gorgon.engine.runner import time_forward

        points = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_rows} & set(range(1, max_rows + 1)))
        times = [time_forward(runner, n) for n in points]
        log.info(
            "verification cost: %s", ", ".join(f"{n} rows {t * 1e3:.1f} ms" for n, t in zip(points, times))
        )
        return cls(tuple(points), tuple(times))

    def seconds(self, rows: int) -> float:
        pts, ts = self.rows, self.seconds_at
        if rows <= pts[0]:
            return ts[0]
        for (r0, t0), (r1, t1) in zip(zip(pts, ts), zip(pts[1:], ts[1:])):
            if rows <= r1:
                return t0 + (t1 - t0) * (rows - r0) / (r1 - r0)
        slope = (ts[-1] - ts[-2]) / (pts[-1] - pts[-2]) if len(pts) > 1 else ts[-1] / pts[-1]
        return ts[-1] + slope * (rows - pts[-1])


class Speculator:
    """Drafts candidate trees from the Medusa heads of the sequences' last accepted hidden states."""

    cost: StepCost | None = None  # measured by the engine at start; None: speculate up to max_batch_size
    heads = None  # Medusa heads (None for drafters that do not use them)
    typical = False  # Medusa's typical acceptance for sampled rows (lossy); else lossless acceptance
    ngram_nodes: tuple[int, ...] = ()  # tree nodes filled by n-gram lookup (`ngram_branch`)
    times: StepTimes  # this engine's measured step times, set in __init__

    def __init__(
        self,
        heads,
        lm_head: torch.nn.Module,
        tree: CandidateTree,
        max_batch_size: int,
        ngram_branch: int = 0,
        max_ngram: int = 3,
    ) -> None:
        tree.check_heads(heads.config.num_heads)
        self.heads = heads
        self.lm_head = lm_head
        self.tree, self.ngram_nodes = with_ngram_branch(tree, min(ngram_branch, heads.config.num_heads))
        self.max_ngram = max_ngram
        self.max_batch_size = max_batch_size
        self.stats = SpeculationStats(accepted_per_depth=[0] * self.tree.depth)
        self.times = StepTimes()

    @property
    def num_speculative_tokens(self) -> int:
        return self.tree.depth

    def should_speculate(self, decoding: int) -> bool:
        """Whether a step with `decoding` decode sequences should verify drafts.

        Speculation pays when the tokens it emits per sequence-step (measured, `expected_tokens`) outweigh
        what its step costs over a plain one: measured on this engine's own steps at this load once both
        kinds were timed (`times`), else estimated from neighbouring loads and the start-up table (`cost`,
        `step_ratio`). Past `max_batch_size` it is off.
        """
        if not 0 < decoding <= self.max_batch_size:
            return False
        return self.times.decide(decoding, self.expected_tokens() / self.step_ratio(decoding))

    def step_ratio(self, decoding: int) -> float:
        """Estimated time of a step with drafts over one without, at this load: measured here when both were
        timed; else the nearest measured load's ratio, carried over by how the start-up table says the
        ratio changes between the two loads (the table alone misses the heads, sampling and drafting);
        else the table's; else 1 (no timing at all: drafts are taken to cost nothing)."""
        on, off = self.times.seconds(decoding, True), self.times.seconds(decoding, False)
        if on is not None and off is not None:
            return on / off
        near = self.times.nearest_ratio(decoding)
        if near is not None:
            load, ratio = near
            return ratio * self._table_ratio(decoding) / self._table_ratio(load)
        return self._table_ratio(decoding)

    def _table_ratio(self, decoding: int) -> float:
        if self.cost is None:
            return 1.0
        return self.cost.seconds(decoding * (1 + self.tree.size)) / self.cost.seconds(decoding)

    def expected_tokens(self) -> float:
        """Tokens per sequence-step with drafts: measured once enough steps were verified, else a prior."""
        stats = self.stats
        if stats.verified_sequences < 32:
            return PRIOR_TOKENS_PER_STEP
        return stats.mean_tokens_per_step

    def tree_from_logits(self, logits: torch.Tensor, seq=None, vocab=None) -> list[int]:
        """[depth, V] speculative logits of one sequence (V: the tokens of `vocab`, a `DraftVocab`, when
        given) -> its candidate tree's node tokens (without the nodes the tree prunes this step)."""
        prune = self.tree.prune_below
        ranked, scores = self._ranked(logits, seq, vocab, prune is not None)
        nodes, filled = self._fill_ngram_branch(self.tree.node_tokens(ranked), seq)
        if prune is None:
            return nodes
        return nodes[: self._kept(scores, filled, prune)]

    def _kept(self, scores: list[list[float]], ngram_filled: bool, prune_below: float) -> int:
        """How many of the tree's nodes to verify: all but the trailing ones (the deepest) whose path score
        is below `prune_below`. A node the n-gram lookup filled has no score and is always kept."""
        paths, keep = self.tree.paths, self.tree.size
        while keep > 0:
            node = keep - 1
            if ngram_filled and node in self.ngram_nodes:
                break
            if sum(scores[depth][rank] for depth, rank in enumerate(paths[node])) >= prune_below:
                break
            keep -= 1
        return keep

    def _ranked(self, logits: torch.Tensor, seq, vocab, with_scores: bool = False):
        """Each depth's top-k guesses, by the heads' logits, reranked with their n-gram table when they
        carry one (it knows the root token the heads drafted without); with `with_scores`, also each guess's
        score (head log-probability + weighted table log-frequency), else None."""
        heads = (seq.medusa if seq is not None else None) or self.heads
        table = heads.ngrams if heads is not None else None
        if table is not None and seq is not None:
            if with_scores:
                return table.rank_scored(logits, seq.token_ids, self.tree.top_k, vocab)
            return table.rank(logits, seq.token_ids, self.tree.top_k, vocab), None
        logits = logits.float()
        values, columns = top_k(logits, self.tree.top_k)
        ranked = (columns if vocab is None else vocab.tokens(columns)).tolist()
        if not with_scores:
            return ranked, None
        return ranked, (values - torch.logsumexp(logits, -1, keepdim=True)).tolist()

    @functools.cached_property
    def _first_level_nodes(self) -> tuple[int, ...]:
        """The tree's first-level nodes other than the n-gram branch's (fixed with the tree)."""
        paths = self.tree.paths
        return tuple(i for i, p in enumerate(paths) if len(p) == 1 and i not in self.ngram_nodes)

    def _fill_ngram_branch(self, nodes: list[int], seq) -> tuple[list[int], bool]:
        """The n-gram branch's nodes take what followed the last earlier occurrence of the sequence's last
        tokens (prompt lookup); without a match, or when its first token is already a first-level node
        (a row spent twice on one token), they keep their Medusa guesses (the next top-k rank). Returns the
        nodes and whether the lookup filled the branch."""
        if self.ngram_nodes and seq is not None:
            follow = lookup(seq.token_ids, len(self.ngram_nodes), self.max_ngram)
            if follow and follow[0] not in {nodes[i] for i in self._first_level_nodes}:
                for node, token in zip(self.ngram_nodes, follow):
                    nodes[node] = token
                return nodes, True
        return nodes, False

    @torch.inference_mode()
    def draft(self, hidden: torch.Tensor, seqs: list) -> list[list[int]]:
        """hidden [N, H]: each sequence's last accepted row (`seqs`, whose last token is the tree's root)
        -> N candidate trees' node tokens."""
        trees: list[list[int]] = [[] for _ in seqs]
        groups: dict[int, list[int]] = {}  # sequences by their heads (a request may name its own)
        for i, seq in enumerate(seqs):
            groups.setdefault(id(seq.medusa or self.heads), []).append(i)
        for members in groups.values():
            heads = seqs[members[0]].medusa or self.heads
            logits = heads.logits(hidden[members], self.lm_head)[:, : self.tree.depth]  # (n, depth, V)
            for i, lg in zip(members, logits):
                trees[i] = self.tree_from_logits(lg, seqs[i])
        return trees


def with_ngram_branch(tree: CandidateTree, depth: int) -> tuple[CandidateTree, tuple[int, ...]]:
    """The tree plus a chain of `depth` nodes (at most the number of heads) for n-gram continuations, and
    those nodes' indices by depth.

    The chain's paths use the rank just past the tree's widest first level (rank R at every depth), so
    without an n-gram match its nodes still hold real Medusa guesses instead of wasting their rows."""
    if depth <= 0:
        return tree, ()
    rank = tree.top_k
    chain = [(rank,) * d for d in range(1, depth + 1)]  # deeper than the tree is fine: the heads reach it
    combined = CandidateTree.from_paths(list(tree.paths) + chain, tree.prune_below)
    index = {p: i for i, p in enumerate(combined.paths)}
    return combined, tuple(index[p] for p in chain)


class NgramSpeculator(Speculator):
    """Prompt lookup (LoRAX's `--speculative-tokens` without a Medusa adapter): find the latest earlier
    occurrence of the sequence's last n tokens (longest n first) and propose what followed it."""

    heads = None

    def __init__(self, num_tokens: int, max_batch_size: int, max_ngram: int = 3) -> None:
        if num_tokens < 1:
            raise ValueError("--speculative-tokens must be at least 1")
        self.tree = CandidateTree.from_paths([(0,) * d for d in range(1, num_tokens + 1)])
        self.max_batch_size = max_batch_size
        self.max_ngram = max_ngram
        self.stats = SpeculationStats(accepted_per_depth=[0] * num_tokens)
        self.times = StepTimes()

    def draft(self, hidden: torch.Tensor, seqs: list) -> list[list[int]]:
        return [lookup(seq.token_ids, self.tree.size, self.max_ngram) for seq in seqs]


def lookup(tokens: list[int], length: int, max_ngram: int) -> list[int]:
    """Up to `length` tokens that followed an earlier occurrence of the longest suffix n-gram: the latest
    occurrence with a full continuation, else the one with the longest."""
    n_tokens = len(tokens)
    for n in range(min(max_ngram, n_tokens - 1), 0, -1):
        suffix = tokens[n_tokens - n :]
        best: list[int] = []
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                follow = tokens[start + n : start + n + length]
                if len(follow) == length:
                    return follow
                best = follow if len(follow) > len(best) else best
        if best:
            return best
    return []


DEFAULT_TREE_FILE = "gorgon_tree.json"  # an adapter directory may carry the tree tuned for it


def build_speculator(spec: SpeculationConfig, model, model_id: str, dtype, device) -> Speculator | None:
    """The engine's speculator: the default Medusa adapter's heads, else n-gram lookup, else None."""
    if spec.adapter_id:
        path, heads = load_heads(
            spec.adapter_id, spec.adapter_source, spec.api_token, model, model_id, dtype, device
        )
        tree_spec = spec.medusa_tree
        if tree_spec is None:
            own = path / DEFAULT_TREE_FILE
            tree_spec = str(own) if own.is_file() else f"chain-{heads.config.num_heads}"
        if tree_spec.startswith("chain-") and tree_spec not in BUILTIN_TREES:
            tree = CandidateTree.from_paths([(0,) * d for d in range(1, int(tree_spec.split("-")[1]) + 1)])
        else:
            tree = CandidateTree.load(tree_spec)
        speculator = Speculator(heads, model.lm_head, tree, spec.max_batch_size, spec.ngram_branch)
        if heads.draft_vocab is not None:  # the default heads draft in the lm_head's pass (see DraftVocab)
            heads.draft_vocab.joint_pass = True
        log.info(
            "speculating with Medusa adapter %s (%s), tree of %d nodes (%d of them n-gram)",
            spec.adapter_id,
            heads.config.describe(),
            speculator.tree.size,
            len(speculator.ngram_nodes),
        )
    elif spec.speculative_tokens:
        log.info("speculating with n-gram lookup, %d tokens", spec.speculative_tokens)
        speculator = NgramSpeculator(spec.speculative_tokens, spec.max_batch_size)
    else:
        return None
    speculator.typical = spec.speculative_sampling == "typical"
    return speculator


def load_heads(
    adapter_id: str, source: str, api_token: str | None, model, model_id: str, dtype, device, path=None
):
    """(directory, MedusaHeads) of a Medusa adapter checked against the served model; ValueError otherwise.
    `path`: the adapter's directory when already resolved."""
    from gorgon.adapters.medusa_io import is_medusa_dir, load_medusa_adapter
    from gorgon.adapters.source import resolve_adapter_dir

    path = path or resolve_adapter_dir(adapter_id, source, api_token=api_token)
    if not is_medusa_dir(path):
        if (path / "adapter_config.json").is_file():
            raise ValueError(f"{adapter_id!r} is a LoRA adapter; this server serves Medusa adapters only")
        raise ValueError(f"{adapter_id!r} is not a Medusa adapter (no config.json with medusa_num_heads)")
    cfg = model.config
    heads = load_medusa_adapter(
        path,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        dtype=dtype,
        device=device,
        model_id=model_id,
    )
    heads.ngrams = load_ngram_table(path, cfg.vocab_size)
    if heads.ngrams is not None and not heads.has_own_lm_heads:
        from gorgon.speculative.draft_vocab import DraftVocab

        heads.draft_vocab = DraftVocab.from_table(heads.ngrams, cfg.vocab_size)
    return path, heads


def load_ngram_table(path, vocab_size: int):
    """The adapter's n-gram table (`gorgon_ngrams.safetensors`), or None when it has none or a bad one: the
    table only ranks drafts, so a broken one is left out with a warning rather than refusing the heads."""
    from gorgon.speculative.ngram_table import NGRAM_FILE, NgramTable

    file = path / NGRAM_FILE
    if not file.is_file():
        return None
    try:
        table = NgramTable.load(file)
    except Exception as e:  # noqa: BLE001 - safetensors and format errors alike
        log.warning("ignoring the n-gram table of %s: %s", path, e)
        return None
    if table.max_token() >= vocab_size:
        log.warning("ignoring the n-gram table of %s: it proposes tokens outside the vocabulary", path)
        return None
    log.info(
        "n-gram table of %s: %d contexts, weight %.2f, floor %.1f",
        path,
        len(table),
        table.weight,
        table.floor,
    )
    return table.index()
