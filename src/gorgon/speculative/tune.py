"""`gorgon tune-tree`: the candidate tree that maximises expected tokens per second on this hardware.

1. Measure each head's top-k accuracy: greedy answers of the base model to tuning prompts, then the heads'
   guesses at every answer position compared with the tokens that really followed.
2. Under independence, a node (r1, ..., rd) is accepted with probability p(0, r1) * ... * p(d-1, rd), and
   siblings are disjoint events, so a tree emits 1 + sum of its nodes' probabilities tokens per step. For
   each size n the best tree takes the n likeliest nodes (a child is never likelier than its parent).
3. Measure the step cost of verifying 1 + n rows, and keep the n with the most tokens per second.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass

import torch

from gorgon.speculative.tree import CandidateTree

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TreeChoice:
    tree: CandidateTree
    expected_tokens: float  # per step
    step_seconds: float
    tokens_per_second: float


def head_accuracy(hidden: torch.Tensor, future: list[int], heads, lm_head, top_k: int) -> torch.Tensor:
    """Hits [num_heads, top_k]: at answer position t (row t of `hidden`), whether head k's rank-r guess is
    the token at t + 2 + k. `future[t]` is the token that followed row t (so head k targets future[t+1+k])."""
    num_heads = heads.config.num_heads
    hits = torch.zeros(num_heads, top_k)
    with torch.inference_mode():
        guesses = heads.logits(hidden, lm_head).topk(top_k, dim=-1).indices  # (T, K, top_k)
    for t in range(hidden.shape[0]):
        for k in range(num_heads):
            if t + 1 + k < len(future):
                hit = (guesses[t, k] == future[t + 1 + k]).nonzero()
                if len(hit):
                    hits[k, int(hit[0])] += 1
    return hits


def best_trees(p: torch.Tensor, max_nodes: int) -> list[tuple[CandidateTree, float]]:
    """For n = 1..max_nodes, the tree of the n likeliest nodes and its expected tokens per step."""
    num_heads, top_k = p.shape
    chosen: list[tuple[int, ...]] = []
    expected = 1.0
    out = []
    frontier = [(-float(p[0, r]), (r,)) for r in range(top_k)]
    heapq.heapify(frontier)
    while frontier and len(chosen) < max_nodes:
        neg_prob, path = heapq.heappop(frontier)
        chosen.append(path)
        expected += -neg_prob
        out.append((CandidateTree.from_paths(list(chosen)), expected))
        if len(path) < num_heads:
            for r in range(top_k):
                heapq.heappush(frontier, (neg_prob * float(p[len(path), r]), (*path, r)))
    return out


def choose_tree(p: torch.Tensor, cost, max_nodes: int) -> tuple[TreeChoice, list[TreeChoice]]:
    """The tree with the most expected tokens per second; also every candidate size, for the report."""
    candidates = []
    for tree, expected in best_trees(p, max_nodes):
        seconds = cost.seconds(1 + tree.size)
        candidates.append(TreeChoice(tree, expected, seconds, expected / seconds))
    best = max(candidates, key=lambda c: c.tokens_per_second)
    return best, candidates


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
    from gorgon.engine.speculation import DEFAULT_TREE_FILE, StepCost, build_speculator
    from gorgon.models.factory import build_model, resolve_device, resolve_dtype
    from gorgon.models.loader import resolve_checkpoint

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
    answers = run_engine(engine, ids, args.max_new_tokens, 8, ignore_eos=False)["outputs"]
    hits, total = None, 0
    for i, prompt in enumerate(ids):
        answer = answers[i]
        h = head_accuracy(
            answer_hidden_states(engine, prompt, answer), answer, spec.heads, model.lm_head, args.top_k
        )
        hits = h if hits is None else hits + h
        total += len(answer)
    p = hits / max(total, 1)
    log.info(
        "head accuracy by rank:\n%s",
        "\n".join(f"head {k}: " + " ".join(f"{x:.3f}" for x in row) for k, row in enumerate(p.tolist())),
    )
    cost = StepCost.measure(engine.runner, 1 + args.max_nodes)
    best, candidates = choose_tree(p, cost, args.max_nodes)
    print(f"{'nodes':>5} {'tokens/step':>12} {'step ms':>8} {'tokens/s':>9}")
    print(f"{0:>5} {1.0:>12.3f} {cost.seconds(1) * 1e3:>8.1f} {1 / cost.seconds(1):>9.1f}")
    for c in candidates:
        mark = "  <- chosen" if c is best else ""
        print(
            f"{c.tree.size:>5} {c.expected_tokens:>12.3f} {c.step_seconds * 1e3:>8.1f} {c.tokens_per_second:>9.1f}{mark}"
        )
    out = Path(args.output) if args.output else Path(args.adapter_id) / DEFAULT_TREE_FILE
    out.write_text(json.dumps([list(path) for path in best.tree.paths]))
    print(
        f"wrote {out} ({best.tree.size} nodes, top-1 accuracy by head: {', '.join(f'{x:.3f}' for x in p[:, 0].tolist())})"
    )
    return 0
