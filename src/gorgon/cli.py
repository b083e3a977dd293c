"""`gorgon` command line: serve | generate | bench."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from gorgon.config import AdapterConfig, EngineConfig, SpeculationConfig
from gorgon.errors import GorgonError

log = logging.getLogger("gorgon")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-id",
        default=None,
        help="hub id, local directory or .gguf file (default: embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--revision", default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    p.add_argument("--max-input-length", type=int, default=d.max_input_length)
    p.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens)
    p.add_argument("--max-batch-prefill-tokens", type=int, default=d.max_batch_prefill_tokens)
    p.add_argument("--max-batch-total-tokens", type=int, default=d.max_batch_total_tokens)
    p.add_argument("--max-concurrent-requests", type=int, default=d.max_concurrent_requests)
    p.add_argument("--max-stop-sequences", type=int, default=d.max_stop_sequences)
    p.add_argument("--max-best-of", type=int, default=d.max_best_of)
    p.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds a request may run from admission to its last token (default: no limit)",
    )


def _add_speculation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter-id",
        default=None,
        help="default adapter: a Medusa adapter speculates for every request; a LoRA serves requests "
        "that name no adapter",
    )
    p.add_argument("--adapter-source", default="hub", choices=["hub", "local"])
    p.add_argument(
        "--medusa-tree",
        default=None,
        help="candidate tree: chain-N, tree-8, tree-16 or a JSON file of paths (or of "
        '{"paths": [...], "prune_below": x}, a tree that leaves out its low-scoring deepest nodes)',
    )
    p.add_argument(
        "--speculative-tokens", type=int, default=0, help="n-gram speculation when no Medusa adapter"
    )
    p.add_argument(
        "--speculation-max-batch-size",
        type=int,
        default=SpeculationConfig.max_batch_size,
        help="decode steps with more sequences run without drafts",
    )
    p.add_argument(
        "--speculative-sampling",
        default="rejection",
        choices=["rejection", "typical"],
        help="how sampled requests accept drafts: rejection (lossless, default) or typical (Medusa's, "
        "faster, changes the output distribution)",
    )
    p.add_argument(
        "--medusa-ngram-branch",
        type=int,
        default=SpeculationConfig.ngram_branch,
        help="a branch of N nodes added to the Medusa tree, filled by n-gram lookup in the request's own text "
        "(0: none)",
    )
    p.add_argument(
        "--no-default-adapter",
        action="store_true",
        help="with the embedded model: do not speculate with its shipped Medusa adapter",
    )


def _add_adapter_args(p: argparse.ArgumentParser) -> None:
    d = AdapterConfig()
    p.add_argument(
        "--preloaded-adapter-ids",
        nargs="*",
        default=[],
        help="adapters (LoRA or Medusa v2) to load at start and keep loaded (source: --adapter-source)",
    )
    p.add_argument(
        "--max-active-adapters", type=int, default=d.max_active_adapters, help="adapters kept loaded (LRU)"
    )
    p.add_argument(
        "--adapter-memory-fraction",
        type=float,
        default=d.memory_fraction,
        help="share of the device's memory (CPU: RAM) that loaded adapters may take",
    )
    p.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        help="directory that adapters named by requests (adapter_source local) must lie in; repeatable",
    )


def _adapter_config(args: argparse.Namespace) -> AdapterConfig:
    return AdapterConfig(
        max_active_adapters=getattr(args, "max_active_adapters", AdapterConfig.max_active_adapters),
        memory_fraction=getattr(args, "adapter_memory_fraction", AdapterConfig.memory_fraction),
        preloaded_adapter_ids=tuple(getattr(args, "preloaded_adapter_ids", None) or ()),
        preloaded_adapter_source=getattr(args, "adapter_source", "hub"),
        adapter_roots=tuple(getattr(args, "adapter_root", None) or ()),
    )


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_input_length=args.max_input_length,
        max_total_tokens=args.max_total_tokens,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens,
        max_batch_total_tokens=args.max_batch_total_tokens,
        max_concurrent_requests=args.max_concurrent_requests,
        max_stop_sequences=args.max_stop_sequences,
        max_best_of=args.max_best_of,
        request_timeout=args.request_timeout,
    )


def _speculation_config(args: argparse.Namespace) -> SpeculationConfig:
    adapter_id = getattr(args, "adapter_id", None)
    source = getattr(args, "adapter_source", "hub")
    wants_default = not getattr(args, "no_default_adapter", False) and not getattr(
        args, "speculative_tokens", 0
    )
    if adapter_id is None and args.model_id is None and wants_default:
        from gorgon.adapters.shipped import default_adapter_dir

        shipped = default_adapter_dir()  # the Medusa adapter shipped for the embedded model, if any
        if shipped is not None:
            adapter_id, source = str(shipped), "local"
    return SpeculationConfig(
        adapter_id=adapter_id,
        adapter_source=source,
        medusa_tree=getattr(args, "medusa_tree", None),
        speculative_tokens=getattr(args, "speculative_tokens", 0),
        max_batch_size=getattr(args, "speculation_max_batch_size", 32),
        speculative_sampling=getattr(args, "speculative_sampling", "rejection"),
        ngram_branch=getattr(args, "medusa_ngram_branch", 1),
    )


def _load_engine(args: argparse.Namespace):
    from gorgon.engine.engine import AsyncEngine

    return AsyncEngine.from_pretrained(
        args.model_id,
        dtype=args.dtype,
        device=args.device,
        engine_config=_engine_config(args),
        revision=args.revision,
        speculation=_speculation_config(args),
        adapters=_adapter_config(args),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gorgon.server.app import create_app

    engine = _load_engine(args)
    engine.start()
    app = create_app(engine, payload_limit=args.payload_limit)
    log.info("serving %s on http://%s:%d", engine.model_id, args.hostname, args.port)
    try:
        uvicorn.run(app, host=args.hostname, port=args.port, log_level="info", timeout_graceful_shutdown=30)
    finally:
        engine.shutdown()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from gorgon.engine.request import (
        FinalOutput,
        GenerationRequest,
        SamplingParams,
        StoppingParams,
        TokenOutput,
    )

    engine = _load_engine(args)
    tok = engine.tokenizer
    if args.raw:
        ids = tok(args.prompt)["input_ids"]
    else:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    request = GenerationRequest(
        prompt_ids=list(ids),
        sampling=SamplingParams(
            do_sample=args.temperature > 0,
            temperature=args.temperature or 1.0,
            top_p=args.top_p,
            seed=args.seed,
        ),
        stopping=StoppingParams(max_new_tokens=args.max_new_tokens),
    )
    engine.start()

    async def run() -> None:
        async for out in engine.generate(request):
            if isinstance(out, TokenOutput):
                if not out.special:
                    sys.stdout.write(out.text)
                    sys.stdout.flush()
            elif isinstance(out, FinalOutput):
                sys.stdout.write("\n")
                log.info("%d tokens, finish reason %s", out.generated_tokens, out.finish_reason)
            else:
                raise SystemExit(out.message)

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
    return 0


def cmd_tune_tree(args: argparse.Namespace) -> int:
    from gorgon.speculative.tune import run_tune_tree

    return run_tune_tree(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from gorgon.bench.run import run_bench

    return run_bench(args)


def cmd_distill(args: argparse.Namespace) -> int:
    from gorgon.training.distill import run_distill

    return run_distill(args, engine_factory=lambda: _load_engine(args))


def cmd_adapter_info(args: argparse.Namespace) -> int:
    from gorgon.adapters.info import format_adapter_info
    from gorgon.adapters.medusa_io import inspect_adapter
    from gorgon.adapters.source import resolve_adapter_dir

    path = resolve_adapter_dir(args.adapter_id, args.adapter_source)
    model = {}
    if args.model_id is not None:
        from gorgon.models.loader import resolve_checkpoint

        ckpt = resolve_checkpoint(args.model_id, args.revision)
        cfg = ckpt.config
        model = {"hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "model_id": ckpt.model_id}
    sys.stdout.write(format_adapter_info(inspect_adapter(path, **model)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from gorgon.train import main as train_main

    return train_main(args.train_argv)  # HfArgumentParser reads them: the Medusa reference command as is


def cmd_export(args: argparse.Namespace) -> int:
    from gorgon.adapters import medusa_io as mio
    from gorgon.training.features import base_lm_head_weight

    adapter = Path(args.adapter_dir)
    config = mio.read_medusa_config(adapter)
    specs = mio.read_specs(mio.medusa_weight_files(adapter))
    layout, _ = mio.detect_layout(
        {n: s.shape for n, s in specs.items() if mio.MEDUSA_KEY.match(n)}, config, adapter
    )
    weight = None
    if not layout.own_lm_heads:  # v2 heads go through the base lm_head: vLLM's format carries a copy
        base = args.model_id or config.get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter} names no base model: pass --model-id (v2 heads need its lm_head).")
        weight = base_lm_head_weight(base, args.revision)
    mio.export_vllm(adapter, Path(args.output_dir), weight)
    log.info("wrote vLLM's Medusa format to %s", args.output_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gorgon", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the LoRAX-compatible HTTP server")
    _add_model_args(serve)
    _add_limit_args(serve)
    serve.add_argument("--hostname", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--payload-limit", type=int, default=2_000_000, help="largest request body in bytes (LoRAX's default)"
    )
    _add_speculation_args(serve)
    _add_adapter_args(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate from one prompt in-process")
    gen.add_argument("prompt")
    _add_model_args(gen)
    _add_limit_args(gen)
    _add_speculation_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="use the prompt as is, without the chat template")
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="tokens/s of the engine against HF transformers")
    _add_model_args(bench)
    bench.add_argument("--dtypes", default="bfloat16,float32")
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--concurrency", type=int, default=8)
    bench.add_argument("--prompts", type=int, default=8, help="number of chat prompts")
    bench.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="speculation mode: interleaved rounds; the median round's speedup is reported, with every round's",
    )
    bench.add_argument(
        "--batch-repeats",
        type=int,
        default=None,
        help="speculation mode: rounds of the concurrent comparison (default 3 x --repeats: a round is one "
        "short batch, and its ratio scatters more than a single-stream round's)",
    )
    bench.add_argument("--output", default="bench-results/bench.json")
    bench.add_argument("--skip-hf", action="store_true")
    bench.add_argument("--prompt-set", default="chat", choices=["chat", "code"])
    bench.add_argument(
        "--lora-adapters",
        type=int,
        default=0,
        help="multi-LoRA mode: this many random LoRA adapters, each concurrent request on its own",
    )
    bench.add_argument("--lora-rank", type=int, default=16)
    _add_speculation_args(bench)  # with an adapter or n-gram tokens: speculation mode (with vs without)
    bench.set_defaults(func=cmd_bench)

    from gorgon.training.distill import add_arguments as add_distill_arguments

    distill = sub.add_parser("distill", help="self-distillation data: the model answers (or writes) chats")
    _add_model_args(distill)
    _add_limit_args(distill)
    add_distill_arguments(distill)
    distill.set_defaults(func=cmd_distill)

    tune = sub.add_parser("tune-tree", help="the Medusa tree with the most expected tokens/s on this machine")
    _add_model_args(tune)
    tune.add_argument("--adapter-id", required=True)
    tune.add_argument("--adapter-source", default="local", choices=["hub", "local"])
    tune.add_argument(
        "--prompts-file", required=True, help="JSON list of prompts (or message lists); not benchmark prompts"
    )
    tune.add_argument("--prompts", type=int, default=32)
    tune.add_argument("--max-new-tokens", type=int, default=128)
    tune.add_argument("--top-k", type=int, default=4)
    tune.add_argument("--max-nodes", type=int, default=32)
    tune.add_argument(
        "--medusa-ngram-branch",
        type=int,
        default=SpeculationConfig.ngram_branch,
        help="n-gram nodes the server will add to the tree (as gorgon serve's flag): counted in cost and gain",
    )
    tune.add_argument(
        "--output",
        default=None,
        help="where to write the tree (default: the adapter's gorgon_tree.json); a refitted n-gram table "
        "goes beside it (gorgon_ngrams.safetensors)",
    )
    tune.add_argument(
        "--fit-ngram-weights",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="refit the weight and floor of the heads' n-gram table on the tuning answers first",
    )
    tune.add_argument(
        "--prune-nodes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit each tree's prune_below (its deepest nodes are not verified when their drafts score "
        "lower) on the tuning answers; --no-prune-nodes writes a fixed tree",
    )
    tune.set_defaults(func=cmd_tune_tree)

    adapter = sub.add_parser("adapter", help="inspect adapters")
    adapter_sub = adapter.add_subparsers(dest="adapter_command", required=True)
    info = adapter_sub.add_parser("info", help="what an adapter is and whether it fits a model")
    info.add_argument("adapter_id", metavar="ID", help="hub id or local directory")
    info.add_argument("--adapter-source", default="hub", choices=["hub", "local"])
    info.add_argument("--model-id", default=None, help="check the adapter against this model")
    info.add_argument("--revision", default=None, help="the model's revision")
    info.set_defaults(func=cmd_adapter_info)

    # Everything after `train` goes to HfArgumentParser (main() hands it on; `gorgon train --help` lists it).
    train = sub.add_parser(
        "train", help="train Medusa heads (HF TrainingArguments; see --help)", add_help=False
    )
    train.set_defaults(func=cmd_train)

    export = sub.add_parser("export", help="write a Medusa adapter in another server's format")
    export.add_argument("--format", required=True, choices=["vllm"])
    export.add_argument("adapter_dir", metavar="DIR", help="Medusa adapter directory")
    export.add_argument("output_dir", metavar="OUT")
    export.add_argument(
        "--model-id", default=None, help="base model (default: the adapter's base_model_name_or_path)"
    )
    export.add_argument("--revision", default=None, help="the base model's revision")
    export.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.func is cmd_train:
        args.train_argv = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, GorgonError) as exc:  # configuration errors: one clear sentence, no traceback
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
