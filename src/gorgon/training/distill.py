"""`gorgon distill`: self-distillation data for Medusa heads.

Every conversation's user turns are replayed against the model, turn by turn, and the model's own answers
replace the dataset's: the heads must learn what *this* model writes. Answers come from an OpenAI-compatible
server (`--url`) or from an in-process engine (`--model-id`, or neither: the embedded default model).
With `--synthesize N` the user instructions themselves come from the model (Magpie, see synthesize.py).

Guarantees:
- No partial conversation is ever written. A request that fails is retried with backoff; a conversation with a
  turn that still fails is left out, counted and reported, and retried by the next run.
- Resumable. Each finished conversation is appended to `OUT.done.jsonl`, keyed by a hash of its replayed turns;
  a rerun skips those and `OUT` (a JSON list of message lists) is assembled from that file. Delete it to start
  over (e.g. after changing the model or the sampling settings).
- An answer cut by `--max-tokens` (finish reason "length") is the model's real output under that budget, so it
  is kept by default (the heads learn from every token of it) but counted and reported; `--drop-truncated`
  leaves such conversations out of `OUT` (they stay in the sidecar, so the choice can be changed later).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gorgon.training.chat_backends import (
    BackendError,
    ChatBackend,
    PermanentError,
    RetryPolicy,
    call_with_retries,
)
from gorgon.training.conversations import Conversation, Message, load_conversations

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayOptions:
    max_tokens: int = 512
    temperature: float = 0.0
    concurrency: int = 8
    seed: int = 0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    model: str = ""  # what answers (server URL and model, or the in-process model id): recorded, not used
    stop_loops: bool = False  # stream answers; stop one stuck in a loop and keep the text before the loop

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("--max-tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")

    @property
    def settings(self) -> dict[str, Any]:
        """What changes the answers; stored with each record so a rerun with other settings is noticed."""
        settings: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens}
        settings["temperature"] = self.temperature
        if self.temperature > 0:
            settings["seed"] = self.seed
        if self.stop_loops:  # absent when off, so stores written before the option still match
            settings["stop_loops"] = True
        return settings


@dataclass
class DistillSummary:
    total: int = 0
    already_done: int = 0
    done: int = 0
    truncated: int = 0  # conversations (done now) with an answer cut by max tokens (or stopped at a loop)
    failed_transient: int = 0  # retries exhausted: a rerun retries them
    failed_permanent: int = 0  # the request itself is refused (too long, 4xx): a rerun fails again
    generated_tokens: int = 0
    elapsed_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.failed_transient + self.failed_permanent

    def summary(self) -> str:
        rate = self.generated_tokens / self.elapsed_s if self.elapsed_s else 0.0
        return (
            f"{self.done} conversations answered now, {self.already_done} done earlier, {self.failed} left out "
            f"({self.failed_transient} after retries, {self.failed_permanent} refused); {self.truncated} with "
            f"an answer cut (--max-tokens or a loop); {self.generated_tokens} tokens in {self.elapsed_s:.1f}s "
            f"({rate:.1f} tokens/s)"
        )


# --- the sidecar of finished conversations --------------------------------------------------------------------
class DoneStore:
    """Append-only JSONL of finished conversations: {"key", "messages", "truncated", "truncated_turns",
    "settings"} (`truncated_turns`: one flag per answer; records written before it have only `truncated`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        bad = 0
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    self.records[rec["key"]] = rec
                except (ValueError, KeyError, TypeError):
                    bad += 1  # a line cut by a killed run: that conversation is simply redone
        if bad:
            log.warning(
                "%s: %d unreadable lines ignored (their conversations will be redone)", self.path, bad
            )

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def add(
        self, key: str, messages: list[Message], truncated_turns: list[bool], settings: dict[str, Any]
    ) -> None:
        rec = {
            "key": key,
            "messages": messages,
            "truncated": any(truncated_turns),
            "truncated_turns": truncated_turns,
            "settings": settings,
        }
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        # One write of a whole line, flushed: a crash leaves at most one cut line, which _load skips.
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
        self.records[key] = rec

    def check_settings(self, settings: dict[str, Any]) -> None:
        other = sum(1 for r in self.records.values() if r.get("settings") != settings)
        if other:
            log.warning(
                "%d finished conversations in %s were made with other settings than %s; they are reused. "
                "Delete the file to start over.",
                other,
                self.path,
                settings,
            )


def sidecar_path(out: Path, kind: str) -> Path:
    return out.with_name(out.name + f".{kind}.jsonl")


# --- replay ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replayed:
    messages: list[Message]
    cut_turns: list[bool]  # per answer: cut by max tokens (or stopped at a loop)
    tokens: int

    @property
    def truncated(self) -> bool:
        return any(self.cut_turns)


async def replay(backend: ChatBackend, conv: Conversation, opts: ReplayOptions) -> Replayed:
    """Answer every user turn with the model, the model's earlier answers as context.

    The dataset's assistant turns are dropped; raises BackendError if any turn fails (nothing partial).
    """
    history: list[Message] = []
    cut_turns: list[bool] = []
    tokens, turn = 0, 0
    for m in conv.prompts:
        history.append(dict(m))
        if m["role"] != "user":
            continue
        seed = None
        if opts.temperature > 0:  # reproducible sampling, independent of scheduling order
            seed = (int(conv.key[:12], 16) + opts.seed * 1_000_003 + turn) % (1 << 62)
        c = await call_with_retries(
            lambda h=list(history), s=seed: backend.chat(
                h,
                max_tokens=opts.max_tokens,
                temperature=opts.temperature,
                seed=s,
                stop_loops=opts.stop_loops,
            ),
            opts.retry,
            f"conversation {conv.index} turn {turn}",
        )
        history.append({"role": "assistant", "content": c.text})
        cut_turns.append(c.truncated)
        tokens += c.completion_tokens
        turn += 1
    return Replayed(history, cut_turns, tokens)


async def distill_conversations(
    backend: ChatBackend,
    conversations: list[Conversation],
    store: DoneStore,
    opts: ReplayOptions,
    progress: bool = True,
) -> DistillSummary:
    """Replay what `store` lacks, `opts.concurrency` conversations at a time, recording each as it finishes."""
    from tqdm import tqdm

    summary = DistillSummary(total=len(conversations))
    todo = [c for c in conversations if c.key not in store]
    summary.already_done = len(conversations) - len(todo)
    store.check_settings(opts.settings)
    sem = asyncio.Semaphore(opts.concurrency)
    bar = tqdm(total=len(todo), desc="distill", unit="conv", disable=not progress or None)
    t0 = time.perf_counter()

    async def one(conv: Conversation) -> None:
        async with sem:
            try:
                r = await replay(backend, conv, opts)
            except BackendError as e:
                if isinstance(e, PermanentError):
                    summary.failed_permanent += 1
                else:
                    summary.failed_transient += 1
                summary.failures.append(f"record {conv.index}: {e}")
                log.warning("conversation %d left out: %s", conv.index, e)
            else:
                store.add(conv.key, r.messages, r.cut_turns, opts.settings)
                summary.done += 1
                summary.truncated += r.truncated
                summary.generated_tokens += r.tokens
            summary.elapsed_s = time.perf_counter() - t0
            bar.update(1)
            rate = summary.generated_tokens / summary.elapsed_s if summary.elapsed_s else 0.0
            bar.set_postfix(failed=summary.failed, cut=summary.truncated, tok_s=f"{rate:.0f}")

    try:
        await asyncio.gather(*(one(c) for c in todo))
    finally:
        bar.close()
    summary.elapsed_s = time.perf_counter() - t0
    return summary


def assemble(conversations: list[Conversation], store: DoneStore, out: Path, drop_truncated: bool) -> int:
    """Write OUT (input order) from the store, atomically; returns how many conversations it holds."""
    data = []
    for c in conversations:
        rec = store.records.get(c.key)
        if rec is None or (drop_truncated and rec.get("truncated")):
            continue
        data.append(rec["messages"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return len(data)


# --- command line ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """`distill`'s own options (cli.py adds the model and engine-limit options)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input-filename", help="ShareGPT or OpenAI-messages conversations, JSON or JSONL")
    src.add_argument(
        "--synthesize", type=int, metavar="N", help="make N instructions with the model (Magpie)"
    )
    p.add_argument("--output-filename", required=True, help="JSON list of message lists")
    p.add_argument(
        "--url",
        default=None,
        help="OpenAI-compatible server (--model-id is then sent as `model`); without it the model runs "
        "in-process",
    )
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token for --url")
    p.add_argument("--concurrency", type=int, default=8, help="conversations (or samples) in flight")
    p.add_argument("--max-tokens", type=int, default=512, help="per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="for answers (0: greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--drop-truncated",
        action="store_true",
        help="leave out conversations cut at --max-tokens (or stopped at a loop)",
    )
    p.add_argument(
        "--stop-loops",
        action="store_true",
        help="stream each answer and stop it once it is stuck in a loop (its last 48 eight-word runs all "
        "seen before), keeping the text before the loop: where `python -m gorgon.training.prepare` cuts a "
        "capped answer, without generating the loop up to --max-tokens",
    )
    p.add_argument("--retries", type=int, default=4, help="retries of a failed request")
    p.add_argument(
        "--retry-backoff", type=float, default=1.0, help="seconds before the first retry (doubles)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request")
    p.add_argument("--no-progress", action="store_true")
    syn = p.add_argument_group("synthesis (--synthesize)")
    syn.add_argument("--topic", default="general", help="general | code | math, or any topic text")
    syn.add_argument("--seed-file", default=None, help="topics, one per line (or a JSON list)")
    syn.add_argument(
        "--hint-mode",
        default="mixed",
        choices=["mixed", "system", "user", "none"],
        help="where task/topic hints go (system prompt, start of the user turn, nowhere; mixed: any)",
    )
    syn.add_argument("--synthesis-temperature", type=float, default=1.0)
    syn.add_argument("--instruction-max-tokens", type=int, default=160)
    syn.add_argument("--max-samples", type=int, default=None, help="give up after this many (default 5N+50)")
    syn.add_argument("--tokenizer", default=None, help="with --url: the served model's tokenizer")


def run_distill(args: argparse.Namespace, engine_factory: Callable[[], Any]) -> int:
    """Entry point of `gorgon distill`. `engine_factory` builds the in-process engine (not started)."""
    return asyncio.run(_run(args, engine_factory))


async def _run(args: argparse.Namespace, engine_factory: Callable[[], Any]) -> int:
    from gorgon.training.chat_backends import EngineChatBackend, HttpChatBackend

    out = Path(args.output_filename)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.url:
        model = f"{args.url} {args.model_id or ''}".strip()
    else:
        model = args.model_id or "embedded default"
    opts = ReplayOptions(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        concurrency=args.concurrency,
        seed=args.seed,
        retry=RetryPolicy(attempts=args.retries + 1, base_delay=args.retry_backoff),
        model=model,
        stop_loops=args.stop_loops,
    )
    if args.input_filename is not None:
        dataset = load_conversations(args.input_filename)
        log.info(
            "%d conversations (%d invalid records skipped, %d duplicates)",
            len(dataset.conversations),
            len(dataset.invalid),
            dataset.duplicates,
        )
        conversations = dataset.conversations
    engine = None
    if args.url:
        backend: ChatBackend = HttpChatBackend(
            args.url,
            model=args.model_id,
            api_key=args.api_key,
            timeout=args.timeout,
            max_connections=max(64, args.concurrency),
        )
        tokenizer = None
    else:
        engine = engine_factory()
        if opts.concurrency > engine.config.max_concurrent_requests:
            raise ValueError("--concurrency must not exceed --max-concurrent-requests")
        engine.start()
        backend = EngineChatBackend(engine)
        tokenizer = engine.tokenizer
    try:
        if args.synthesize is not None:
            if tokenizer is None:
                tokenizer = _load_tokenizer(args.tokenizer or args.model_id)
            conversations = await synthesize_conversations(backend, tokenizer, args, opts.retry, out)
        store = DoneStore(sidecar_path(out, "done"))
        summary = await distill_conversations(backend, conversations, store, opts, not args.no_progress)
    finally:
        await backend.aclose()
        if engine is not None:
            engine.shutdown()
    written = assemble(conversations, store, out, args.drop_truncated)
    log.info("%s", summary.summary())
    cut = sum(1 for c in conversations if store.records.get(c.key, {}).get("truncated"))
    log.info(
        "wrote %d conversations to %s (%d with an answer cut at --max-tokens: %s)",
        written,
        out,
        cut,
        "left out" if args.drop_truncated else "kept",
    )
    if summary.failed:
        log.error(
            "%d conversations left out: %d failed after retries (rerun the same command to retry them), "
            "%d refused (a rerun fails again; e.g. raise the length limits). First failures: %s",
            summary.failed,
            summary.failed_transient,
            summary.failed_permanent,
            "; ".join(summary.failures[:3]),
        )
        return 1
    return 0


async def synthesize_conversations(
    backend: ChatBackend, tokenizer: Any, args: argparse.Namespace, retry: RetryPolicy, out: Path
) -> list[Conversation]:
    """`--synthesize N` user instructions (resumed from `OUT.instructions.jsonl`), as one-turn conversations."""
    from tqdm import tqdm

    from gorgon.training.seeds import SeedSampler, read_seed_file
    from gorgon.training.synthesize import Instruction, SynthesisConfig, Synthesizer

    n = args.synthesize
    path = sidecar_path(out, "instructions")
    earlier = _read_jsonl(path)
    texts = [r["instruction"] for r in earlier if isinstance(r.get("instruction"), str)][:n]
    if len(texts) < n:
        topics = read_seed_file(args.seed_file) if args.seed_file else None
        sampler = SeedSampler(args.topic, topics, args.hint_mode)
        config = SynthesisConfig(
            n=n - len(texts),
            concurrency=args.concurrency,
            temperature=args.synthesis_temperature,
            max_tokens=args.instruction_max_tokens,
            seed=args.seed,
            max_samples=args.max_samples,
            retry=retry,
        )
        synth = Synthesizer(backend, tokenizer, sampler, config)
        synth.preload(texts)
        start = 1 + max((int(r.get("sample_index", -1)) for r in earlier), default=-1)
        bar = tqdm(
            total=n, initial=len(texts), desc="synthesize", unit="instr", disable=args.no_progress or None
        )

        def keep(ins: Instruction) -> None:
            texts.append(ins.text)
            rec = {"instruction": ins.text, "sample_index": ins.sample_index, **asdict(ins.seed)}
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            bar.update(1)
            bar.set_postfix(sampled=synth.stats.sampled, unique_per_100=f"{synth.stats.unique_per_100:.0f}")

        try:
            stats = await synth.run(start, keep)
        finally:
            bar.close()
        log.info("synthesis: %s", stats.summary())
        if len(texts) < n:
            log.warning(
                "only %d of %d instructions after %d samples (raise --max-samples, or vary the seeds)",
                len(texts),
                n,
                stats.sampled,
            )
    else:
        log.info("%d instructions already synthesized in %s", n, path)
    return [Conversation(({"role": "user", "content": t},), index=i) for i, t in enumerate(texts[:n])]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a killed run
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _load_tokenizer(name: str | None) -> Any:
    """The tokenizer for Magpie prefixes when the model is behind --url (None: the embedded default's)."""
    if name is None:
        from gorgon.models.loader import resolve_checkpoint

        log.warning("--url without --tokenizer/--model-id: using the embedded default model's chat template")
        return resolve_checkpoint(None).tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)
