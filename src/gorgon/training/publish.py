"""The trained adapter's model card, and publishing the adapter folder to the hub.

What is pushed is exactly the adapter directory's own files (config.json, medusa_lm_head.safetensors,
README.md, and a tuned gorgon_tree.json if present) at the repository root: the layout LoRAX, TGI and
Gorgon load from the hub as is. Trainer checkpoints and logs in the same output directory are never pushed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import create_repo, upload_folder

from gorgon.adapters.medusa import MedusaConfig
from gorgon.adapters.medusa_io import CONFIG_FILE, WEIGHTS_FILE
from gorgon.engine.speculation import DEFAULT_TREE_FILE

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, DEFAULT_TREE_FILE)


@dataclass(frozen=True)
class TrainingSummary:
    base_model: str
    data_path: str
    medusa: MedusaConfig
    train_conversations: int
    eval_conversations: int
    train_positions: int
    epochs: float
    steps: int
    learning_rate: float
    batch_size: int  # effective: per device x accumulation x processes
    max_length: int
    feature_dtype: str
    train_seconds: float
    ms_per_position: float  # training time per trained position per epoch
    train_loss: float
    head_decay: float
    eval_metrics: dict[str, float] = field(default_factory=dict)  # summarize()'s names, no eval_ prefix
    best_step: int | None = None
    ngram_contexts: int | None = None  # contexts in gorgon_ngrams.safetensors, when written
    train_vocab: int | None = None  # tokens of the training softmax, when not the whole vocabulary
    train_vocab_coverage: float | None = None  # fraction of the answer tokens among them
    distill: float = 0.0  # share of the base model's soft label in each head's training loss


def _hub_id(name: str) -> str | None:
    # A hub id is `org/name` and not a local path; a card's base_model must be one to link.
    parts = name.split("/")
    return name if len(parts) == 2 and all(parts) and not Path(name).exists() else None


def _loss_words(distill: float) -> str:
    if not distill:
        return "cross-entropy"
    return (
        f"{1 - distill:g} x cross-entropy on the answer token + {distill:g} x cross-entropy on the base "
        "model's own distribution over it (self-distillation)"
    )


def model_card(s: TrainingSummary) -> str:
    m = s.medusa
    lines = ["---"]
    base_id = _hub_id(s.base_model)
    if base_id:
        lines.append(f"base_model: {base_id}")
    lines += ["library_name: gorgon", "tags:", "- medusa", "- speculative-decoding", "- gorgon", "---", ""]
    lm = "each with its own LM head" if m.has_own_lm_heads else "sharing the base model's lm_head"
    lines += [
        f"# Medusa heads for {s.base_model}",
        "",
        (
            f"{m.num_heads} Medusa v{m.version} heads ({m.num_layers} residual block(s) each, {lm}), trained with "
            "Gorgon (`gorgon train`) on the frozen base model's own hidden states. Head k drafts the token k+2 "
            "places ahead; the base model verifies every draft, so outputs do not change, only speed."
        ),
        "",
        "## Use",
        "",
        "```",
        f"gorgon serve --model-id {s.base_model} --adapter-id <this repo or directory>",
        "gorgon export --format vllm <this directory> <out>   # vLLM's Medusa format",
        "```",
        "",
        (
            "The folder is in the Medusa repository's format (config.json, medusa_lm_head.safetensors): LoRAX and "
            "TGI load it from the hub as is."
        ),
        "",
    ]
    if s.ngram_contexts is not None:
        lines += [
            (
                f"`gorgon_ngrams.safetensors` ({s.ngram_contexts} contexts): what the model wrote next after 1-3 "
                "tokens in the training answers. Gorgon reranks the heads' drafts with it (it knows the token "
                "the heads draft after); other servers ignore the file."
            ),
            "",
        ]
    lines += [
        "## Training data",
        "",
        f"- data: `{s.data_path}`",
        f"- {s.train_conversations} training conversations, {s.eval_conversations} validation conversations",
        (
            f"- {s.train_positions} trained positions (positions with an assistant token 2 to "
            f"{m.num_heads + 1} places ahead; the loss sees assistant tokens only)"
        ),
        f"- conversations cut to {s.max_length} tokens; hidden states in {s.feature_dtype}",
        "",
        "## Training",
        "",
        (
            f"- {s.epochs:g} epoch(s), {s.steps} optimizer steps, learning rate {s.learning_rate:g}, "
            f"effective batch {s.batch_size} conversations"
        ),
        (
            f"- loss: {_loss_words(s.distill)} per head on assistant tokens, head k weighted {s.head_decay:g}^k; "
            f"final training loss {s.train_loss:.4f}"
        ),
        f"- {s.train_seconds:.1f} s ({s.ms_per_position:.3f} ms per position per epoch)",
    ]
    if s.train_vocab is not None:
        lines.append(
            f"- training softmax over the n-gram table's {s.train_vocab} tokens (the ones Gorgon drafts from; "
            f"{100 * (s.train_vocab_coverage or 0):.2f}% of the answer tokens), validation over the whole "
            "vocabulary"
        )
    if s.best_step is not None:
        lines.append(f"- heads kept from step {s.best_step} (best validation accepted tokens per step)")
    lines += ["", "## Validation", ""]
    ev = s.eval_metrics
    if f"head{m.num_heads - 1}_top1" in ev:
        lines += [
            f"On {s.eval_conversations} held-out conversations (teacher forced):",
            "",
            "| head | predicts | top-1 accuracy | loss |",
            "|---|---|---|---|",
        ]
        for k in range(m.num_heads):
            lines.append(f"| {k} | t+{k + 2} | {ev[f'head{k}_top1']:.3f} | {ev[f'head{k}_loss']:.3f} |")
        accepted = ev.get("accepted_per_step", 0.0)
        lines += [
            "",
            (
                f"A chain of all {m.num_heads} heads would accept {accepted:.3f} draft tokens per step on this data, "
                f"about {1 + accepted:.2f} tokens per step with the base model's own token."
            ),
        ]
    else:
        lines.append("No validation split was held out.")
    return "\n".join(lines) + "\n"


def write_model_card(out_dir: Path, summary: TrainingSummary) -> Path:
    path = Path(out_dir) / CARD_FILE
    path.write_text(model_card(summary))
    return path


def push_adapter(out_dir: Path, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Upload the adapter's own files (never Trainer checkpoints) to the hub repository `repo_id`."""
    out_dir = Path(out_dir)
    files = [out_dir / name for name in ADAPTER_FILES if (out_dir / name).is_file()]
    if not any(f.name == WEIGHTS_FILE for f in files):
        raise ValueError(f"{out_dir} holds no {WEIGHTS_FILE}: nothing to push.")
    create_repo(repo_id, token=token, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gorgon-push-") as staging:
        for f in files:
            shutil.copy2(f, Path(staging) / f.name)
        info = upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            token=token,
            commit_message="Upload Medusa heads trained with Gorgon",
        )
    log.info("Pushed %s to the hub as %s", ", ".join(f.name for f in files), repo_id)
    return str(getattr(info, "commit_url", info))
