"""Train Medusa heads with the HF Trainer over the frozen base model's precomputed hidden states.

The base model runs once (features.py); what the Trainer trains is `MedusaTrainingModel`: the heads plus the
frozen base lm_head weight, taking hidden states and labels. Per-head loss and top-1 accuracy are logged for
training and validation; the heads with the best validation `accepted_per_step` are kept. The result is a
Medusa adapter directory (config.json, medusa_lm_head.safetensors) with a README.md model card, pushed to
the hub with `--push_to_hub`.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from gorgon.adapters.medusa import MedusaConfig, MedusaHeads
from gorgon.adapters.medusa_io import save_medusa_adapter
from gorgon.kernels.linear import InvariantLinear
from gorgon.speculative.ngram_table import NGRAM_FILE, NgramTable
from gorgon.training.data import IGNORE_INDEX, load_message_lists_from, tokenize_conversations
from gorgon.training.medusa_loss import HEAD_DECAY, head_targets, medusa_loss, summarize
from gorgon.training.ngrams import table_of

log = logging.getLogger(__name__)

BEST_METRIC = "eval_accepted_per_step"


class MedusaTrainingModel(nn.Module):
    """The heads over precomputed hidden states, through the frozen base lm_head (v2) or their own (v1).

    The lm_head weight is a plain attribute, not a buffer: it is not trained, not checkpointed, and not
    broadcast by DDP every step; it follows the inputs to their device.

    With a training vocabulary (v2), training steps take the softmax over those tokens only: the rows of
    lm_head they keep, and labels outside them ignored. The vocabulary projection is most of a step's cost
    and Gorgon drafts from that vocabulary anyway (`speculative.draft_vocab`). Evaluation keeps the whole
    vocabulary, so validation figures hold for servers that draft through the full lm_head.
    """

    def __init__(
        self,
        heads: MedusaHeads,
        lm_head_weight: torch.Tensor,
        decay: float = HEAD_DECAY,
        train_vocab: torch.Tensor | None = None,  # sorted token ids (v2 only)
        distill: float = 0.0,  # soft-label share of the training loss (validation stays hard CE)
    ) -> None:
        super().__init__()
        self.heads = heads
        for module in heads.modules():
            if isinstance(module, InvariantLinear):
                module.use_kernel = False  # autocast and autograd need the plain BLAS path
        self.lm_head_weight = lm_head_weight.detach()
        self.decay = decay
        self.distill = distill
        self.train_weight: torch.Tensor | None = None
        self.train_index: torch.Tensor | None = None  # token id -> its row in train_weight, or ignored
        if train_vocab is not None:
            if heads.has_own_lm_heads:
                raise ValueError("a training vocabulary needs v2 heads (they share the frozen base lm_head)")
            ids = train_vocab.to(torch.long)
            self.train_weight = self.lm_head_weight[ids]
            self.train_index = torch.full((lm_head_weight.shape[0],), IGNORE_INDEX, dtype=torch.long)
            self.train_index[ids] = torch.arange(len(ids))

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        device = hidden_states.device
        if self.lm_head_weight.device != device:
            self.lm_head_weight = self.lm_head_weight.to(device)
        weight = self.lm_head_weight
        if self.training and self.train_weight is not None:
            if self.train_weight.device != device:
                self.train_weight, self.train_index = (
                    self.train_weight.to(device),
                    self.train_index.to(device),
                )
            weight = self.train_weight
            labels = torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, self.train_index[labels.clamp_min(0)])
        autocast = torch.is_autocast_enabled(device.type)
        compute = torch.get_autocast_dtype(device.type) if autocast else torch.float32
        distill = self.distill if self.training else 0.0
        out = medusa_loss(self.heads, hidden_states, labels, weight, compute, self.decay, distill)
        return {"loss": out.loss, "stats": out.stats}


class HiddenStateDataset(torch.utils.data.Dataset):
    def __init__(self, hidden: list[torch.Tensor], labels: list[list[int]]) -> None:
        self.hidden = hidden
        self.labels = [torch.tensor(x, dtype=torch.long) for x in labels]

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"hidden_states": self.hidden[i], "labels": self.labels[i]}

    def label_coverage(self, vocab: torch.Tensor) -> float:
        """Fraction of the labelled (assistant) tokens that are in `vocab`."""
        labels = torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)
        labels = labels[labels != IGNORE_INDEX]
        return float(torch.isin(labels, vocab).float().mean()) if len(labels) else 1.0

    def num_positions(self, num_heads: int) -> int:
        """Positions some head has a label for: what one epoch runs through the heads."""
        return sum(int((head_targets(y[None], num_heads) != IGNORE_INDEX).any(-1).sum()) for y in self.labels)


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence: zero hidden states, ignored labels."""
    T = max(x["labels"].shape[0] for x in items)
    H = items[0]["hidden_states"].shape[-1]
    hidden = items[0]["hidden_states"].new_zeros(len(items), T, H)
    labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
    for b, x in enumerate(items):
        n = x["labels"].shape[0]
        hidden[b, :n], labels[b, :n] = x["hidden_states"], x["labels"]
    return {"hidden_states": hidden, "labels": labels}


def compute_metrics(prediction) -> dict[str, float]:
    stats = prediction.predictions
    stats = stats[0] if isinstance(stats, tuple) else stats
    return summarize(torch.as_tensor(stats))


class MedusaTrainer(Trainer):
    """Trainer whose training logs carry per-head loss and top-1 accuracy since the previous log."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._train_stats: torch.Tensor | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            stats = outputs["stats"].detach().sum(0)
            self._train_stats = stats if self._train_stats is None else self._train_stats + stats
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_stats is not None:
            logs.update({k: round(v, 4) for k, v in summarize(self._train_stats.cpu()).items()})
            self._train_stats = None
        super().log(logs, start_time)


class KeepBestHeads(TrainerCallback):
    """Snapshots the heads whenever validation improves, so the best ones are saved whatever the
    checkpointing (the reference command saves none). Heads are small; v1 ones hold their LM heads."""

    def __init__(self, heads: MedusaHeads, metric: str = BEST_METRIC) -> None:
        self.heads, self.metric = heads, metric
        self.best: float | None = None
        self.best_step = 0
        self._state: dict[str, torch.Tensor] | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is not None and (self.best is None or value > self.best):
            self.best, self.best_step = value, state.global_step
            self._state = {k: v.detach().to("cpu", copy=True) for k, v in self.heads.state_dict().items()}

    def restore(self) -> bool:
        if self._state is None:
            return False
        self.heads.load_state_dict(self._state)
        return True


@dataclass
class PreparedData:
    train: HiddenStateDataset
    eval: HiddenStateDataset | None
    num_train_conversations: int
    num_eval_conversations: int
    ngrams: NgramTable | None = None  # next-token counts of the training answers (drafting aid)


def split_conversations(convs: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random held-out split: round(n * fraction) conversations, at least one (when n > 1)."""
    if fraction <= 0 or len(convs) < 2:
        return convs, []
    n_val = min(len(convs) - 1, max(1, round(len(convs) * fraction)))
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]


def _model_key(ckpt) -> str:
    """Identifies the base weights for the hidden-state cache: path, config, and weight files' sizes/times."""
    from gorgon.models.loader import weight_files

    h = hashlib.sha256(str(Path(ckpt.path).resolve()).encode())
    h.update((Path(ckpt.path) / "config.json").read_bytes())
    for f in weight_files(Path(ckpt.path)):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def prepare_data(
    ckpt, base, data_args, max_length: int, seed: int, ngram_table: bool = False
) -> PreparedData:
    """Tokenise, split, and run the base model once over train and validation conversations (and count the
    training answers' n-grams)."""
    from gorgon.training.features import cached_hidden_states

    convs = load_message_lists_from(data_args.data_path)
    if data_args.eval_data_path:
        train_convs, eval_convs = convs, load_message_lists_from(data_args.eval_data_path)
    else:
        train_convs, eval_convs = split_conversations(convs, data_args.validation_split, seed)
    tok = ckpt.tokenizer
    train = tokenize_conversations(tok, train_convs, max_length)
    evals = None
    if eval_convs:
        try:
            evals = tokenize_conversations(tok, eval_convs, max_length)
        except ValueError as e:
            log.warning("No validation split: %s", e)
    key = _model_key(ckpt)
    cache = data_args.features_cache_dir

    def dataset(tokenized) -> HiddenStateDataset:
        hidden = cached_hidden_states(base, [c.input_ids for c in tokenized.items], cache, key)
        return HiddenStateDataset(hidden, [c.labels for c in tokenized.items])

    log.info(
        "Training on %d conversations (%d tokens, %d assistant), validating on %d",
        len(train.items),
        train.num_tokens,
        train.num_assistant_tokens,
        len(evals.items) if evals else 0,
    )
    ngrams = None
    if ngram_table:
        ngrams = table_of(train)
        log.info("n-gram table of the training answers: %d contexts", len(ngrams))
    return PreparedData(
        dataset(train),
        dataset(evals) if evals else None,
        len(train.items),
        len(evals.items) if evals else 0,
        ngrams,
    )


@dataclass
class TrainResult:
    output_dir: Path
    summary: Any  # publish.TrainingSummary
    log_history: list[dict[str, float]]  # the Trainer's logs: training and validation metrics by step
    model: MedusaTrainingModel  # the trained (best) heads


def train_medusa(model_args, data_args, medusa_args, args) -> TrainResult:
    """Train, keep the best heads, write the adapter and its model card (and push them)."""
    from transformers import set_seed

    from gorgon.models.loader import resolve_checkpoint
    from gorgon.training.features import load_base_model
    from gorgon.training.publish import TrainingSummary, push_adapter, write_model_card

    set_seed(args.seed)
    if not args.should_log:  # under torchrun, one process reports
        logging.getLogger("gorgon").setLevel(logging.WARNING)
    ckpt = resolve_checkpoint(model_args.model_id, model_args.model_revision)
    cfg = ckpt.config
    # The adapter's config names its base; a local directory by its absolute path, so exports find it.
    base_name = str(Path(ckpt.model_id).resolve()) if Path(ckpt.model_id).exists() else ckpt.model_id
    max_length = args.model_max_length
    if max_length > cfg.max_position_embeddings:
        log.warning(
            "--model_max_length %d exceeds the model's %d positions: using %d",
            max_length,
            cfg.max_position_embeddings,
            cfg.max_position_embeddings,
        )
        max_length = cfg.max_position_embeddings
    if data_args.lazy_preprocess:
        log.info("--lazy_preprocess: hidden states are computed once up front, so it changes nothing")

    base, feature_dtype = load_base_model(ckpt, model_args.feature_dtype, args.device)
    data = prepare_data(ckpt, base, data_args, max_length, args.seed, medusa_args.medusa_ngram_table)
    lm_head_weight = base.lm_head.weight.detach().to("cpu", copy=True)
    del base  # only its lm_head is needed from here on

    medusa_config = MedusaConfig(
        num_heads=medusa_args.medusa_num_heads,
        num_layers=medusa_args.medusa_num_layers,
        version=medusa_args.medusa_version,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        base_model_name_or_path=base_name,
    )
    heads = MedusaHeads.init_for_training(medusa_config, lm_head_weight.float())
    train_vocab, coverage = None, None
    if medusa_args.medusa_train_vocab == "ngrams":
        train_vocab = torch.from_numpy(data.ngrams.vocabulary())
        coverage = data.train.label_coverage(train_vocab)
        log.info(
            "Training softmax over the n-gram table's %d tokens (%.2f%% of the answer tokens)",
            len(train_vocab),
            100 * coverage,
        )
    model = MedusaTrainingModel(
        heads, lm_head_weight, medusa_args.medusa_head_decay, train_vocab, medusa_args.medusa_distill
    )

    if data.eval is None and str(getattr(args.eval_strategy, "value", args.eval_strategy)) != "no":
        log.warning("No validation conversations: evaluation during training is off")
        args.eval_strategy = "no"
    if args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = False  # every head takes part in every step (even with no rows)
    push = args.push_to_hub  # the adapter folder is pushed below, never Trainer's checkpoints
    args.push_to_hub = False
    keep_best = (
        KeepBestHeads(heads) if (args.keep_best and data.eval and not args.load_best_model_at_end) else None
    )
    trainer = MedusaTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=collate,
        compute_metrics=compute_metrics,
        callbacks=[keep_best] if keep_best else None,
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    train_seconds = float(result.metrics["train_runtime"])  # the training loop (with its evaluations)
    positions = data.train.num_positions(medusa_config.num_heads)
    epochs = float(trainer.state.epoch or args.num_train_epochs)
    ms_per_position = 1e3 * train_seconds / max(positions * epochs, 1e-9)
    log.info(
        "Trained %s in %.1f s: %.3f ms per position per epoch (%d positions)",
        medusa_config.describe(),
        train_seconds,
        ms_per_position,
        positions,
    )
    best_step = None
    if keep_best and keep_best.restore():
        best_step = keep_best.best_step
        log.info("Kept the heads of step %d (%s %.4f)", best_step, keep_best.metric, keep_best.best)
    metrics = trainer.evaluate() if data.eval else {}

    out_dir = Path(args.output_dir)
    summary = TrainingSummary(
        base_model=base_name,
        data_path=str(data_args.data_path),
        medusa=medusa_config,
        train_conversations=data.num_train_conversations,
        eval_conversations=data.num_eval_conversations,
        train_positions=positions,
        epochs=epochs,
        steps=result.global_step,
        learning_rate=args.learning_rate,
        batch_size=args.per_device_train_batch_size
        * args.gradient_accumulation_steps
        * max(args.world_size, 1),
        max_length=max_length,
        feature_dtype=str(feature_dtype).removeprefix("torch."),
        train_seconds=train_seconds,
        ms_per_position=ms_per_position,
        train_loss=float(result.training_loss),
        head_decay=medusa_args.medusa_head_decay,
        eval_metrics={k.removeprefix("eval_"): v for k, v in metrics.items()},
        best_step=best_step,
        ngram_contexts=len(data.ngrams) if data.ngrams is not None else None,
        train_vocab=len(train_vocab) if train_vocab is not None else None,
        train_vocab_coverage=coverage,
        distill=medusa_args.medusa_distill,
    )
    if trainer.is_world_process_zero():
        save_medusa_adapter(heads, out_dir, base_name)
        if data.ngrams is not None:
            data.ngrams.save(out_dir / NGRAM_FILE)
        write_model_card(out_dir, summary)
        if push:
            push_adapter(out_dir, args.hub_model_id or out_dir.name, args.hub_token, args.hub_private_repo)
    return TrainResult(out_dir, summary, list(trainer.state.log_history), model)
