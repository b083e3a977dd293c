"""`gorgon bench`: tokens/s of the engine, single stream and concurrent, against HF transformers `generate`
on the same prompts, dtype and machine, in one run. Prints a table and writes JSON."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gorgon.bench.prompts import CHAT_PROMPTS, PROMPT_SETS
from gorgon.config import EngineConfig, SpeculationConfig
from gorgon.engine.llm_engine import LLMEngine
from gorgon.engine.request import FinalOutput, GenerationRequest, SamplingParams, StoppingParams
from gorgon.engine.speculation import build_speculator
from gorgon.models.factory import build_model, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _request(ids: list[int], max_new: int, ignore_eos: bool = True) -> GenerationRequest:
    # ignore_eos: every run generates exactly max_new tokens, so engines are compared on equal work.
    stopping = StoppingParams(max_new_tokens=max_new, ignore_eos_token=ignore_eos)
    return GenerationRequest(ids, SamplingParams(), stopping)


def run_engine(
    engine: LLMEngine,
    prompts: list[list[int]],
    max_new: int,
    concurrency: int,
    ignore_eos: bool = True,
    loras: list | None = None,
) -> dict:
    """Run `prompts` through the engine, `concurrency` at a time (prompt i with LoRA adapter `loras[i]`
    when given). Returns tokens/s and the outputs."""
    results: dict[int, list[int]] = {}
    tokens = 0
    start = time.perf_counter()
    pending = list(enumerate(prompts))
    in_flight = 0
    bar = tqdm(total=len(prompts) * max_new, desc=f"gorgon x{concurrency}", unit="tok", leave=False)

    def sink_for(i: int):
        def sink(out) -> None:
            nonlocal in_flight, tokens
            if isinstance(out, FinalOutput):
                results[i] = [t.id for t in out.tokens]
                tokens += out.generated_tokens
                in_flight -= 1
            else:
                bar.update(1)

        return sink

    while pending or in_flight:
        while pending and in_flight < concurrency:
            i, ids = pending.pop(0)
            lora = loras[i] if loras else None
            engine.add_request(_request(ids, max_new, ignore_eos), sink_for(i), lora=lora)
            in_flight += 1
        engine.step()
    bar.close()
    elapsed = time.perf_counter() - start
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed, "outputs": results}


def interleaved(
    engines: dict[str, LLMEngine], batches: list[list[list[int]]], max_new: int, concurrency: int
) -> dict[str, dict]:
    """Each engine runs every batch of prompts (`concurrency` at a time), the engines taking turns batch by
    batch in alternating order (ABBA), so that a slow spell of the machine falls on both alike. Returns per
    engine the summed tokens/s and the outputs (prompt index across the batches -> tokens)."""
    names = list(engines)
    totals = {n: {"tokens": 0, "seconds": 0.0, "outputs": {}} for n in names}
    first = 0  # index of the batch's first prompt
    for i, batch in enumerate(batches):
        for name in names if i % 2 == 0 else names[::-1]:
            run = run_engine(engines[name], batch, max_new, concurrency, ignore_eos=False)
            totals[name]["tokens"] += run["tokens"]
            totals[name]["seconds"] += run["seconds"]
            totals[name]["outputs"].update({first + k: v for k, v in run["outputs"].items()})
        first += len(batch)
    for t in totals.values():
        t["tok_s"] = t["tokens"] / t["seconds"]
    return totals


def run_hf(path: Path, dtype: torch.dtype, prompts: list[list[int]], max_new: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokens, outputs = 0, {}
    start = time.perf_counter()
    for i, ids in enumerate(tqdm(prompts, desc="hf generate", leave=False)):
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False
            )
        outputs[i] = out[0, len(ids) :].tolist()
        tokens += len(outputs[i])
    elapsed = time.perf_counter() - start
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed, "outputs": outputs}


def bench_dtype(ckpt, dtype_name: str, args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(dtype_name, device)
    eos = set(ckpt.config.eos_token_ids)
    prompts = [chat_ids(ckpt.tokenizer, p) for p in CHAT_PROMPTS[: args.prompts]]

    def engine(batch_invariant: bool) -> LLMEngine:
        model = build_model(ckpt, dtype, device)
        config = EngineConfig(batch_invariant=batch_invariant)
        llm = LLMEngine(model, ckpt.tokenizer, config, dtype, device, eos)
        run_engine(llm, prompts[:1], 8, 1)  # warm-up (packs weights, compiles nothing)
        return llm

    invariant = engine(True)
    single = run_engine(invariant, prompts, args.max_new_tokens, 1)
    batch = run_engine(invariant, prompts, args.max_new_tokens, args.concurrency)
    del invariant
    plain = run_engine(engine(False), prompts, args.max_new_tokens, 1)
    row = {
        "dtype": dtype_name,
        "gorgon_single_tok_s": single["tok_s"],
        f"gorgon_x{args.concurrency}_tok_s": batch["tok_s"],
        "concurrency_gain": batch["tok_s"] / single["tok_s"],
        # Batch invariance, end to end: the same greedy tokens alone and in a batch.
        "batch_invariant_outputs": single["outputs"] == batch["outputs"],
        # What invariance costs: the same engine on plain BLAS calls without padding (not invariant).
        "plain_blas_single_tok_s": plain["tok_s"],
        "invariant_vs_plain_blas": single["tok_s"] / plain["tok_s"],
    }
    if not args.skip_hf:
        hf = run_hf(ckpt.path, dtype, prompts, args.max_new_tokens)
        row["hf_generate_tok_s"] = hf["tok_s"]
        row["speedup_vs_hf"] = single["tok_s"] / hf["tok_s"]
        same = sum(hf["outputs"][i] == single["outputs"][i] for i in range(len(prompts)))
        row["greedy_outputs_equal_to_hf"] = f"{same}/{len(prompts)}"
    return row


def bench_speculation(ckpt, dtype_name: str, args: argparse.Namespace) -> dict:
    """The same prompts with and without speculation, in one run: speed, acceptance, identical outputs."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(dtype_name, device)
    eos = set(ckpt.config.eos_token_ids)
    prompts = [chat_ids(ckpt.tokenizer, p) for p in PROMPT_SETS[args.prompt_set][: args.prompts]]
    model = build_model(ckpt, dtype, device)
    spec_config = SpeculationConfig(
        adapter_id=args.adapter_id,
        adapter_source=args.adapter_source,
        medusa_tree=args.medusa_tree,
        speculative_tokens=args.speculative_tokens,
        max_batch_size=args.speculation_max_batch_size,
        ngram_branch=args.medusa_ngram_branch,
    )
    speculator = build_speculator(spec_config, model, ckpt.model_id, dtype, device)
    plain = LLMEngine(model, ckpt.tokenizer, EngineConfig(), dtype, device, eos)
    fast = LLMEngine(model, ckpt.tokenizer, EngineConfig(), dtype, device, eos, speculator)
    for engine in (plain, fast):
        run_engine(engine, prompts[:1], 8, 1)  # warm-up
    # Greedy decoding stops at EOS here: acceptance is measured on the model's real answers.
    # Repeated rounds, each interleaved: this shared machine's speed drifts by +-15% between runs, so a ratio
    # is taken within each round and the median round reported, with the spread.
    engines = {"plain": plain, "speculative": fast}
    rounds = {"single": [], "batch": []}
    single_rounds = max(1, args.repeats)
    batch_rounds = max(1, args.batch_repeats if args.batch_repeats is not None else 3 * single_rounds)
    for i in range(max(single_rounds, batch_rounds)):
        if i < single_rounds:
            rounds["single"].append(interleaved(engines, [[p] for p in prompts], args.max_new_tokens, 1))
        if i < batch_rounds:
            rounds["batch"].append(interleaved(engines, [prompts], args.max_new_tokens, args.concurrency))
    results = {name: {kind: _median_round(rounds[kind])[name] for kind in rounds} for name in engines}
    same = all(
        r["plain"]["outputs"] == r["speculative"]["outputs"] == rounds["single"][0]["plain"]["outputs"]
        for kind in rounds
        for r in rounds[kind]
    )
    stats = speculator.stats
    p, f = results["plain"], results["speculative"]
    return {
        "dtype": dtype_name,
        "prompt_set": args.prompt_set,
        "tree_nodes": speculator.tree.size,
        "plain_single_tok_s": p["single"]["tok_s"],
        "spec_single_tok_s": f["single"]["tok_s"],
        "single_speedup": f["single"]["tok_s"] / p["single"]["tok_s"],
        "single_speedup_rounds": _ratios(rounds["single"]),
        f"plain_x{args.concurrency}_tok_s": p["batch"]["tok_s"],
        f"spec_x{args.concurrency}_tok_s": f["batch"]["tok_s"],
        f"x{args.concurrency}_speedup": f["batch"]["tok_s"] / p["batch"]["tok_s"],
        f"x{args.concurrency}_speedup_rounds": _ratios(rounds["batch"]),
        # All rounds pooled (tokens over seconds summed per engine): steadier than one median round.
        f"x{args.concurrency}_speedup_pooled": _pooled_speedup(rounds["batch"]),
        "mean_tokens_per_step": stats.mean_tokens_per_step,
        "head_acceptance": ", ".join(f"{a:.2f}" for a in stats.head_acceptance()),
        "steps_with_drafts": f"{stats.steps_on}/{stats.steps_on + stats.steps_off}",
        "greedy_outputs_identical": same,
    }


def _speedup(r: dict) -> float:
    return r["speculative"]["tok_s"] / r["plain"]["tok_s"]


def _median_round(rounds: list[dict]) -> dict:
    """The round with the median speedup (the lower middle one for an even count)."""
    return sorted(rounds, key=_speedup)[(len(rounds) - 1) // 2]


def _pooled_speedup(rounds: list[dict]) -> float:
    def rate(name: str) -> float:
        return sum(r[name]["tokens"] for r in rounds) / sum(r[name]["seconds"] for r in rounds)

    return rate("speculative") / rate("plain")


def _ratios(rounds: list[dict]) -> str:
    return " ".join(f"{_speedup(r):.2f}" for r in rounds)


def run_bench(args: argparse.Namespace) -> int:
    from gorgon.models.loader import resolve_checkpoint

    ckpt = resolve_checkpoint(args.model_id, args.revision)
    from gorgon.bench.lora import bench_lora

    if getattr(args, "lora_adapters", 0):
        bench = bench_lora
    elif args.adapter_id or args.speculative_tokens:
        bench = bench_speculation
    else:
        bench = bench_dtype
    rows = [bench(ckpt, d.strip(), args) for d in args.dtypes.split(",")]
    report = {
        "model": ckpt.model_id,
        "max_new_tokens": args.max_new_tokens,
        "prompts": args.prompts,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "results": rows,
    }
    _print_table(rows)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def _print_table(rows: list[dict]) -> None:
    keys = [k for k in rows[0] if k != "dtype"]
    print(f"{'metric':32s}" + "".join(f"{r['dtype']:>14s}" for r in rows))
    for k in keys:
        cells = []
        for r in rows:
            v = r.get(k, "")
            cells.append(f"{v:14.2f}" if isinstance(v, float) else f"{v!s:>14s}")
        print(f"{k:32s}" + "".join(cells))
