"""`gorgon tune-tree`: the candidate tree that maximises expected tokens per second on this hardware.

1. Measure each head's top-k accuracy: greedy answers of the base model to tuning prompts, then the heads'
   guesses at every answer position compared with the tokens that really followed.
2. Measure each node's acceptance on the same answers: node (r1, ..., rd) is accepted at a position when
   head 0's rank-r1 guess, head 1's rank-r2 guess, ... are the tokens that followed. Siblings are disjoint
   events, so a tree emits 1 + sum of its nodes' acceptances tokens per step. For each size n the best tree
   takes the n likeliest nodes (a child is never likelier than its parent). Measured, not multiplied from
   per-head accuracies: the heads are right together far more often than independence predicts (chat heads:
   node (0, 0) 0.16 on the benchmark against 0.438 x 0.259 = 0.11, session 9).
3. The serving default adds an n-gram node (`--medusa-ngram-branch 1`): a first-level node holding what
   followed the last earlier occurrence of the text's last tokens, else head 0's next-ranked guess. Its
   gain, counted only where no tree node already holds the right token, is measured on the same answers.
4. Measure the step cost of verifying the tree's rows (with the n-gram node's) and of its heads' rows
   through the lm_head, and keep the tree with the most tokens per second.
5. Each tree may prune (`CandidateTree.prune_below`): at every answer row, the score of each node's drafts
   (as the server scores them) says which trailing nodes the server would not verify; the fit takes the
   threshold whose fewer rows and lost acceptances give the most tokens per second (`prune_choice`), and
   trees are compared pruned. A deep node then pays for its row on the steps where its drafts are likely,
   so the chosen tree may be deeper than a fixed one would be.

Heads that carry an n-gram table first get the table's weight and floor refitted (`fit_ngram_weights`, a
small grid) on the same answers, before any of the above: how much to trust the table depends on the heads
and on the prompts. The fitted values are written into the adapter's table with its tree.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from gorgon.speculative.tree import CandidateTree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TreeChoice:
    tree: CandidateTree
    expected_tokens: float  # per step
    step_seconds: float
    tokens_per_second: float


def head_guesses(
    hidden: torch.Tensor, heads, lm_head, top_k: int, contexts: list[list[int]] | None = None
) -> torch.Tensor:
    """[T, num_heads, top_k] each head's top-k token ids at each row, as the server ranks them: reranked
    by the heads' n-gram table when they carry one, with `contexts[t]` the tokens up to row t's root."""
    return ranked_guesses(draft_logits(hidden, heads, lm_head), heads, top_k, contexts)


def draft_logits(hidden: torch.Tensor, heads, lm_head) -> torch.Tensor:
    """[T, num_heads, V] the heads' logits at each row, over their drafting vocabulary when they have one
    (the server drafts from it only)."""
    with torch.inference_mode():
        if heads.draft_vocab is None:
            return heads.logits(hidden, lm_head)
        return heads.draft_vocab.logits(heads.hidden_states(hidden), lm_head)


def ranked_guesses(
    logits: torch.Tensor, heads, top_k: int, contexts: list[list[int]] | None = None
) -> torch.Tensor:
    """`head_guesses` from the heads' logits (`draft_logits`)."""
    return scored_guesses(logits, heads, top_k, contexts, normalize=False)[0]


def scored_guesses(
    logits: torch.Tensor, heads, top_k: int, contexts: list[list[int]] | None = None, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ranked_guesses` and each guess's score [T, num_heads, top_k], as the server scores drafts to prune
    a tree's nodes: head log-probability + the table's weighted log-frequency where it knows the context.
    Without `normalize`, raw logits stand for the log-probabilities (the same ranking, one pass less)."""
    vocab = heads.draft_vocab
    if heads.ngrams is None or contexts is None:
        logits = torch.log_softmax(logits.float(), dim=-1) if normalize else logits
        values, columns = logits.topk(top_k, dim=-1)
        return (columns if vocab is None else vocab.tokens(columns)), values
    rows = [heads.ngrams.rank_scored(row, ctx, top_k, vocab, normalize) for row, ctx in zip(logits, contexts)]
    shape = (len(rows), logits.shape[1], top_k)
    guesses = torch.tensor([r for r, _ in rows], dtype=torch.long).view(shape)
    return guesses, torch.tensor([sc for _, sc in rows], dtype=torch.float64).view(shape)


# The table's weight against the heads' log-probabilities, and the log-frequency it gives a token never seen
# after a known context. On the general heads' validation answers (session 10, *script*) the top-1 chain
# accepted 0.687 tokens per step at the old fixed 0.75 / log(1e-3), 0.713 at 1.0 / log(1e-4).
WEIGHT_GRID = (0.5, 0.75, 1.0, 1.25, 1.5)
FLOOR_GRID = (math.log(1e-3), math.log(1e-4), math.log(1e-5))


@dataclass(frozen=True)
class AnswerRows:
    """One tuning answer, as the heads see it: the final hidden states of the rows whose next token is
    `answer[t]`, the prompt, and the answer."""

    hidden: torch.Tensor  # [T, H]
    prompt: list[int]
    answer: list[int]

    def contexts(self) -> list[list[int]]:
        return [self.prompt + self.answer[: t + 1] for t in range(self.hidden.shape[0])]  # row t's root


def fit_ngram_weights(heads, lm_head, answers: list[AnswerRows]) -> tuple[float, float, dict]:
    """(weight, floor, {(weight, floor): accepted tokens}) of the heads' n-gram table: the grid point whose
    reranked top-1 chain of all heads gets the most draft tokens accepted on `answers`; the table's current
    values win ties. Leaves the table at the chosen values."""
    table = heads.ngrams
    logits = [draft_logits(a.hidden, heads, lm_head) for a in answers]  # the weights only rerank them
    current = (table.weight, table.floor)
    scores = {}
    for weight, floor in [current, *itertools.product(WEIGHT_GRID, FLOOR_GRID)]:
        if (weight, floor) in scores:
            continue
        table.weight, table.floor = weight, floor
        scores[weight, floor] = sum(
            sum(chain_hits(ranked_guesses(lg, heads, 1, a.contexts()), a.answer).values())
            for lg, a in zip(logits, answers)
        )
    best = max(scores, key=lambda k: (scores[k], k == current))
    table.weight, table.floor = best
    return best[0], best[1], scores


def head_accuracy(
    hidden: torch.Tensor, future: list[int], heads, lm_head, top_k: int, guesses: torch.Tensor | None = None
) -> torch.Tensor:
    """Hits [num_heads, top_k]: at answer position t (row t of `hidden`), whether head k's rank-r guess is
    the token at t + 2 + k. `future[t]` is the token that followed row t (so head k targets future[t+1+k])."""
    num_heads = heads.config.num_heads
    hits = torch.zeros(num_heads, top_k)
    if guesses is None:
        guesses = head_guesses(hidden, heads, lm_head, top_k)
    for t in range(hidden.shape[0]):
        for k in range(num_heads):
            if t + 1 + k < len(future):
                hit = (guesses[t, k] == future[t + 1 + k]).nonzero()
                if len(hit):
                    hits[k, int(hit[0])] += 1
    return hits


def chain_hits(guesses: torch.Tensor, future: list[int]) -> Counter:
    """Hits per tree node: at answer row t, the ranks at which heads 0, 1, ... guessed the tokens that
    followed (`future[t + 1 + k]` for head k), as deep as they keep guessing right: the path a verification
    would accept, and each of its prefixes, count one hit. `guesses` [T, num_heads, top_k] (`head_guesses`)."""
    return node_hits(hit_paths(guesses, future))


def node_hits(paths: list[tuple[int, ...]]) -> Counter:
    """Hits per tree node from each row's deepest right path (`hit_paths`): the path and its prefixes."""
    return Counter(path[:d] for path in paths for d in range(1, len(path) + 1))


def hit_paths(guesses: torch.Tensor, future: list[int]) -> list[tuple[int, ...]]:
    """Per answer row, the deepest path of ranks the heads guessed right (`chain_hits`): node p is
    accepted there when p is a prefix of it."""
    out = []
    for t, ranked in enumerate(guesses.tolist()):
        path: tuple[int, ...] = ()
        for k, guessed in enumerate(ranked):
            if t + 1 + k >= len(future) or future[t + 1 + k] not in guessed:
                break
            path += (guessed.index(future[t + 1 + k]),)
        out.append(path)
    return out


def best_trees(
    acceptance: Mapping[tuple[int, ...], float], max_nodes: int
) -> list[tuple[CandidateTree, float]]:
    """For n = 1..max_nodes, the tree of the n likeliest nodes and its expected tokens per step. `acceptance`:
    each node's measured acceptance (nodes never accepted may be left out). A node is accepted only with its
    parent, so taking nodes likeliest first (shorter first on ties) keeps every parent in the tree."""
    ranked = sorted(acceptance.items(), key=lambda item: (-item[1], len(item[0]), item[0]))
    out, chosen, expected = [], [], 1.0
    for path, probability in ranked[:max_nodes]:
        chosen.append(path)
        expected += probability
        out.append((CandidateTree.from_paths(list(chosen)), expected))
    return out


def ngram_hits(
    prompt: list[int], answer: list[int], guesses0: torch.Tensor, max_ngram: int = 3
) -> torch.Tensor:
    """Hits [top_k]: at each answer position, whether the n-gram node would add an accepted token to a tree
    whose first level holds head 0's top-R guesses (R = 1..top_k): its lookup token (or, without a match or
    when that token is already one of the R guesses, head 0's rank-R guess) is the token that came next and
    is not already among those R guesses.
    `guesses0` [T, top_k + 1] are head 0's guesses at answer rows (row t guesses answer[t + 1])."""
    from gorgon.engine.speculation import lookup

    top_k = guesses0.shape[1] - 1
    hits = torch.zeros(top_k)
    tokens = prompt + answer[:1]
    for t in range(len(answer) - 1):
        target = answer[t + 1]
        follow = lookup(tokens, 1, max_ngram)
        ranked = guesses0[t].tolist()
        for r in range(1, top_k + 1):
            token = follow[0] if follow and follow[0] not in ranked[:r] else ranked[r]
            if token == target and target not in ranked[:r]:
                hits[r - 1] += 1
        tokens.append(target)
    return hits


def candidates(
    acceptance: Mapping[tuple[int, ...], float], max_nodes: int, ngram: torch.Tensor | None = None
) -> list[tuple[CandidateTree, float, int, int]]:
    """(tree, expected tokens per step, verified rows, head depth) of the best tree of each size: what
    `choose_tree` prices. `ngram`: with an n-gram node, its gain [R - 1] for trees whose first level is R
    wide (`ngram_hits`)."""
    out = []
    for tree, expected in best_trees(acceptance, max_nodes):
        rows = 1 + tree.size
        if ngram is not None:
            # The server's n-gram node falls back to head 0's rank tree.top_k; its gain is counted as if the
            # first level held every rank below that (exact unless a deeper level is wider than the first).
            expected += float(ngram[min(tree.top_k, len(ngram)) - 1])
            rows += 1
        out.append((tree, expected, rows, tree.depth))
    return out


def choose_tree(
    acceptance: Mapping[tuple[int, ...], float],
    cost,
    max_nodes: int,
    ngram: torch.Tensor | None = None,
    drafts: PositionDrafts | None = None,
    branch: int = 0,
) -> tuple[TreeChoice, list[TreeChoice]]:
    """The tree with the most expected tokens per second; also every candidate size, for the report.
    `acceptance`: each node's measured acceptance (`chain_hits` over the answer positions).
    `cost(rows, depth)`: seconds of a step verifying `rows` rows whose heads draft `depth` deep (VerifyCost).
    `ngram`: as for `candidates`. `drafts`: the answers' rows, to fit each tree's `prune_below`
    (`prune_choice`; the served tree adds `branch` n-gram nodes); without them no tree prunes."""
    from gorgon.engine.speculation import with_ngram_branch

    branch = min(branch, max(len(p) for p in acceptance)) if ngram is not None else 0  # as the server
    choices = []
    for tree, expected, rows, depth in candidates(acceptance, max_nodes, ngram):
        if drafts is None:
            seconds = cost(rows, depth)
            choices.append(TreeChoice(tree, expected, seconds, expected / seconds))
            continue
        served, ngram_nodes = with_ngram_branch(tree, branch)
        fit = prune_choice(served, ngram_nodes, drafts, expected, cost, branch)
        pruned = replace(tree, prune_below=fit.tree.prune_below)
        choices.append(TreeChoice(pruned, fit.expected_tokens, fit.step_seconds, fit.tokens_per_second))
    best = max(choices, key=lambda c: c.tokens_per_second)
    return best, choices


# Candidate `prune_below` values: path scores are sums of log-probabilities and weighted log-frequencies.
PRUNE_GRID = tuple(float(x) for x in range(-20, -1))


@dataclass(frozen=True)
class PositionDrafts:
    """The tuning answers' rows as a tree sees them: the path the heads guessed right at each row
    (`hit_paths`) and every guess's score [T, num_heads, top_k] (`scored_guesses`)."""

    hits: list[tuple[int, ...]]
    scores: torch.Tensor


def prune_choice(
    tree: CandidateTree,
    ngram_nodes: tuple[int, ...],
    drafts: PositionDrafts,
    expected: float,
    cost,
    branch: int,
) -> TreeChoice:
    """The `prune_below` (or none) that gives `tree` the most tokens per second on `drafts`: at each row the
    server keeps all but the trailing nodes scoring below it (`Speculator._kept`; the n-gram nodes are taken
    as always kept), so the step verifies fewer rows and loses the pruned nodes' acceptances. `tree`: the
    served tree (with its n-gram nodes); `expected`: its tokens per step unpruned (`candidates`)."""
    paths, size, depth = tree.paths, tree.size, tree.depth
    n = len(drafts.hits)
    scores = drafts.scores.double()
    node_scores = torch.full((n, size), math.inf, dtype=torch.float64)
    accepted = torch.zeros(n, size, dtype=torch.float64)
    for i, path in enumerate(paths):
        if i in ngram_nodes:
            continue  # its score is not the heads' when the lookup fills it; its gain is in `expected`
        ranks = torch.tensor(path)
        node_scores[:, i] = scores[:, torch.arange(len(path)), ranks].sum(dim=1)
        accepted[:, i] = torch.tensor([float(h[: len(path)] == path) for h in drafts.hits])
    extra_rows = max(branch - 1, 0)  # VerifyCost counts n-gram nodes past the first itself

    def step(rows: int) -> float:
        return cost(rows - extra_rows, depth)

    full = TreeChoice(tree, expected, step(1 + size), expected / step(1 + size))
    best = full
    for threshold in PRUNE_GRID:
        below = (node_scores < threshold).flip(1).to(torch.long)
        keep = size - below.cumprod(dim=1).sum(dim=1)  # all but the trailing run of low nodes
        pruned = torch.arange(size)[None, :] >= keep[:, None]
        tokens = expected - float((accepted * pruned).sum()) / max(n, 1)
        rows, counts = torch.unique(1 + keep, return_counts=True)
        seconds = sum(step(int(r)) * int(c) for r, c in zip(rows, counts)) / max(n, 1)
        choice = TreeChoice(replace(tree, prune_below=threshold), tokens, seconds, tokens / seconds)
        if choice.tokens_per_second > best.tokens_per_second:
            best = choice
    return best


class VerifyCost:
    """Measured seconds of a verification step: `rows` verified rows of one sequence (the tree's, plus
    `branch` n-gram nodes deeper than the first; attention reads their shared keys once), and the Medusa
    heads' rows of each through the lm_head (every verified row drafts `depth` heads, as the runner does;
    through the heads' drafting vocabulary when they have one). Each shape keeps its fastest step."""

    def __init__(self, runner, branch: int = 0, vocab=None) -> None:
        self.runner, self.branch, self.vocab, self.cache = runner, branch, vocab, {}

    def measure(self, shapes: list[tuple[int, int]], rounds: int = 5) -> None:
        """Time every (rows, depth) shape `rounds` times, round-robin: this shared machine slows down for
        seconds at a time, and shapes timed one after another compared a slow spell with a quiet one (a
        1-row step measured 17.4 ms and 2 rows 22.5 ms in one run, *script*); interleaved, each keeps its
        fastest step."""
        for _ in range(rounds):
            for rows, depth in shapes:
                self._time(rows, depth)

    def __call__(self, rows: int, depth: int) -> float:
        key = self._key(rows, depth)
        if key not in self.cache:
            self._time(rows, depth)
        return self.cache[key]

    def _key(self, rows: int, depth: int) -> tuple[int, int]:
        rows += max(self.branch - 1, 0)
        return rows, (max(depth, min(self.branch, 1)) if rows > 1 else 0)

    def _time(self, rows: int, depth: int) -> None:
        from gorgon.engine.runner import time_forward

        key = self._key(rows, depth)
        seconds = time_forward(
            self.runner, key[0], repeats=1, head_depth=key[1], vocab=self.vocab, shared=True
        )
        self.cache[key] = min(seconds, self.cache.get(key, float("inf")))


def answer_hidden_states(engine, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """Final hidden states of the rows that predict the answer's tokens (the last prompt row onward), from
    one prefill of prompt + answer through the engine's runner."""
    from gorgon.engine.request import GenerationRequest, SamplingParams, StoppingParams
    from gorgon.engine.scheduler import ScheduledChunk, StepPlan
    from gorgon.engine.sequence import Sequence

    tokens = prompt + answer
    seq = Sequence(GenerationRequest(tokens, SamplingParams(), StoppingParams(max_new_tokens=1)), seed=0)
    allocator = engine.scheduler.allocator
    seq.slots = allocator.allocate(len(tokens))
    try:
        out = engine.runner.run(StepPlan([ScheduledChunk(seq, 0, tokens, True, False)]))
    finally:
        allocator.free(seq.slots)
    return out.hidden[0][len(prompt) - 1 : len(tokens) - 1]


def run_tune_tree(args) -> int:
    """CLI entry: measure, choose, report, write the chosen tree as JSON paths."""
    import json
    from pathlib import Path

    from gorgon.bench.run import chat_ids, run_engine
    from gorgon.config import EngineConfig, SpeculationConfig
    from gorgon.engine.llm_engine import LLMEngine
    from gorgon.engine.speculation import DEFAULT_TREE_FILE, build_speculator
    from gorgon.models.factory import build_model, resolve_device, resolve_dtype
    from gorgon.models.loader import resolve_checkpoint
    from gorgon.speculative.ngram_table import NGRAM_FILE

    ckpt = resolve_checkpoint(args.model_id, args.revision)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = build_model(ckpt, dtype, device)
    spec = build_speculator(
        SpeculationConfig(adapter_id=args.adapter_id, adapter_source=args.adapter_source),
        model,
        ckpt.model_id,
        dtype,
        device,
    )
    if spec is None or spec.heads is None:
        raise ValueError("gorgon tune-tree needs a Medusa adapter (--adapter-id)")
    prompts = json.loads(Path(args.prompts_file).read_text())
    prompts = [p if isinstance(p, str) else p[0]["content"] for p in prompts][: args.prompts]
    engine = LLMEngine(model, ckpt.tokenizer, EngineConfig(), dtype, device, set(ckpt.config.eos_token_ids))
    ids = [chat_ids(ckpt.tokenizer, p) for p in prompts]
    outputs = run_engine(engine, ids, args.max_new_tokens, 8, ignore_eos=False)["outputs"]
    answers = [
        AnswerRows(answer_hidden_states(engine, p, outputs[i]), p, outputs[i]) for i, p in enumerate(ids)
    ]
    out = Path(args.output) if args.output else Path(args.adapter_id) / DEFAULT_TREE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    heads = spec.heads
    if heads.ngrams is not None and args.fit_ngram_weights:
        before = (heads.ngrams.weight, heads.ngrams.floor)
        weight, floor, scores = fit_ngram_weights(heads, model.lm_head, answers)
        log.info(
            "n-gram table weight %g, floor log(%.0e): top-1 chain %d accepted tokens (was %g, log(%.0e): %d)",
            weight, math.exp(floor), scores[weight, floor], before[0], math.exp(before[1]), scores[before],
        )  # fmt: skip
        table_out = out.with_name(NGRAM_FILE)
        heads.ngrams.save(table_out)
        print(f"wrote {table_out} (n-gram weight {weight:g}, floor log({math.exp(floor):.0e}))")
    branch = args.medusa_ngram_branch
    hits, nodes, ngram, total = None, Counter(), torch.zeros(args.top_k), 0
    paths, scores = [], []
    for a in answers:
        hidden, prompt, answer = a.hidden, a.prompt, a.answer
        logits = draft_logits(hidden, heads, model.lm_head)
        guesses, guess_scores = scored_guesses(logits, heads, args.top_k + 1, a.contexts())
        h = head_accuracy(hidden, answer, heads, model.lm_head, args.top_k, guesses[..., : args.top_k])
        hits = h if hits is None else hits + h
        rows = hit_paths(guesses[..., : args.top_k], answer)
        nodes.update(node_hits(rows))
        paths += rows
        scores.append(guess_scores)
        if branch:
            ngram += ngram_hits(prompt, answer, guesses[:, 0])
        total += len(answer)
    drafts = PositionDrafts(paths, torch.cat(scores)) if args.prune_nodes else None
    p = hits / max(total, 1)
    log.info(
        "head accuracy by rank:\n%s",
        "\n".join(f"head {k}: " + " ".join(f"{x:.3f}" for x in row) for k, row in enumerate(p.tolist())),
    )
    if branch:
        log.info(
            "n-gram node gain by first-level width: %s",
            " ".join(f"{x:.3f}" for x in (ngram / total).tolist()),
        )
    cost = VerifyCost(engine.runner, branch, spec.heads.draft_vocab)
    # Every node the heads can fill, unseen ones at 0 (heads that never guess right still get a tree).
    depths = range(1, spec.heads.config.num_heads + 1)
    acceptance = {path: 0.0 for d in depths for path in itertools.product(range(args.top_k), repeat=d)}
    acceptance.update((path, n / max(total, 1)) for path, n in nodes.items())
    log.info(
        "node acceptance (likeliest first): %s",
        ", ".join(
            f"{list(path)} {a:.3f}" for path, a in sorted(acceptance.items(), key=lambda x: -x[1])[:12]
        ),
    )
    gain = ngram / max(total, 1) if branch else None
    shapes = {(1, 0)}
    for _, _, rows, depth in candidates(acceptance, args.max_nodes, gain):
        # A pruned tree verifies fewer rows: time each count its steps may take.
        shapes.update((r, depth) for r in (range(2, rows + 1) if drafts is not None else [rows]))
    cost.measure(sorted(shapes))
    best, choices = choose_tree(acceptance, cost, args.max_nodes, gain, drafts, branch)
    print(
        f"{'nodes':>5} {'tokens/step':>12} {'step ms':>8} {'tokens/s':>9} {'prune below':>12}"
        f"  (n-gram branch: {branch} node(s))"
    )
    print(f"{0:>5} {1.0:>12.3f} {cost(1, 0) * 1e3:>8.1f} {1 / cost(1, 0):>9.1f}")
    for c in choices:
        mark = "  <- chosen" if c is best else ""
        prune = "-" if c.tree.prune_below is None else f"{c.tree.prune_below:g}"
        print(
            f"{c.tree.size:>5} {c.expected_tokens:>12.3f} {c.step_seconds * 1e3:>8.1f} "
            f"{c.tokens_per_second:>9.1f} {prune:>12}{mark}"
        )
    out.write_text(json.dumps(best.tree.to_json()))
    print(
        f"wrote {out} ({best.tree.size} nodes, top-1 accuracy by head: {', '.join(f'{x:.3f}' for x in p[:, 0].tolist())})"
    )
    return 0
