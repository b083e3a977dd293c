"""`gorgon train` / `python -m gorgon.train`: train Medusa heads on a frozen base model.

Takes the Medusa repository's reference command as is: HF `TrainingArguments` plus `--model_name_or_path
--data_path --model_max_length --lazy_preprocess --medusa_num_heads --medusa_num_layers` (and the old
`--evaluation_strategy`), parsed by `HfArgumentParser`, so it runs unchanged under `torchrun` or
`accelerate launch`. Where the hardware lacks bf16 or TF32 it says so and carries on without them.

    python -m gorgon.train --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct --data_path chats.json \\
        --bf16 True --output_dir medusa-smollm2 --num_train_epochs 2 --per_device_train_batch_size 8 \\
        --learning_rate 1e-3 --lr_scheduler_type cosine --warmup_ratio 0.1 --medusa_num_heads 3
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from transformers import TrainingArguments

log = logging.getLogger("gorgon.train")

EMBEDDED = "embedded"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=EMBEDDED,
        metadata={"help": "hub id, local directory, .gguf file, or `embedded` (SmolLM2-135M-Instruct)"},
    )
    model_revision: str | None = field(default=None, metadata={"help": "the base model's hub revision"})
    feature_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the base model's hidden states (auto: the serving dtype of the device)",
            "choices": ["auto", "float32", "bfloat16", "float16"],
        },
    )

    @property
    def model_id(self) -> str | None:
        """What `resolve_checkpoint` takes: None for the embedded default."""
        return None if self.model_name_or_path in ("", EMBEDDED) else self.model_name_or_path


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None,
        metadata={
            "help": "JSON/JSONL of message lists (as `gorgon distill` writes), OpenAI messages or ShareGPT; "
            "several files separated by commas are trained on together"
        },
    )
    eval_data_path: str | None = field(
        default=None, metadata={"help": "validation conversations (default: a split of --data_path)"}
    )
    validation_split: float = field(
        default=0.05, metadata={"help": "fraction of the conversations held out for validation (0: none)"}
    )
    lazy_preprocess: bool = field(
        default=False,
        metadata={"help": "accepted for the reference command; hidden states are computed up front anyway"},
    )
    features_cache_dir: str | None = field(
        default=None,
        metadata={"help": "reuse the base model's hidden states across runs from this directory"},
    )


@dataclass
class MedusaArguments:
    medusa_num_heads: int = field(default=3, metadata={"help": "number of heads (speculative tokens)"})
    medusa_num_layers: int = field(default=1, metadata={"help": "residual blocks per head (v2: exactly 1)"})
    medusa_version: int = field(
        default=2,
        metadata={
            "help": "2: heads share the base lm_head (small); 1: each head has its own",
            "choices": [1, 2],
        },
    )
    medusa_head_decay: float = field(default=0.8, metadata={"help": "head k's loss weight is decay^k"})
    medusa_distill: float = field(
        default=0.0,
        metadata={
            "help": "0..1: share of the base model's own distribution over each target (a soft label, from "
            "the hidden states already computed) in the heads' training loss; 0 is the reference's plain "
            "cross-entropy"
        },
    )
    medusa_ngram_table: bool = field(
        default=True,
        metadata={
            "help": "also write gorgon_ngrams.safetensors: next-token counts of the training answers, with "
            "which Gorgon reranks the heads' drafts (other servers ignore the file)"
        },
    )
    medusa_train_vocab: str = field(
        default="full",
        metadata={
            "help": "full: the training softmax spans the whole vocabulary (the reference's loss); ngrams "
            "(v2 with the n-gram table): only the table's tokens, the ones Gorgon drafts from, "
            "cheaper per position. Validation always uses the whole vocabulary",
            "choices": ["full", "ngrams"],
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.medusa_distill <= 1.0:
            raise ValueError(f"--medusa_distill must be between 0 and 1, got {self.medusa_distill}")
        if self.medusa_train_vocab == "ngrams" and (self.medusa_version != 2 or not self.medusa_ngram_table):
            raise ValueError(
                "--medusa_train_vocab ngrams trains v2 heads over their n-gram table's tokens: it needs "
                "--medusa_version 2 and --medusa_ngram_table True."
            )


@dataclass
class MedusaTrainingArguments(TrainingArguments):
    model_max_length: int = field(
        default=2048, metadata={"help": "conversations are cut to this many tokens"}
    )
    evaluation_strategy: str | None = field(
        default=None, metadata={"help": "old name of --eval_strategy (transformers < 4.46)"}
    )
    warmup_ratio: float | None = field(
        default=None, metadata={"help": "old name of a fractional --warmup_steps (transformers < 5)"}
    )
    keep_best: bool = field(
        default=True,
        metadata={
            "help": "keep the heads with the best validation accepted_per_step (in memory, no checkpoints)"
        },
    )

    def __post_init__(self) -> None:
        if self.evaluation_strategy is not None:
            if str(getattr(self.eval_strategy, "value", self.eval_strategy)) not in (
                "no",
                self.evaluation_strategy,
            ):
                raise ValueError(
                    "--evaluation_strategy and --eval_strategy disagree: give only --eval_strategy."
                )
            self.eval_strategy = self.evaluation_strategy
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}.")
            if self.warmup_steps not in (0, self.warmup_ratio):
                raise ValueError("--warmup_ratio and --warmup_steps disagree: give only --warmup_steps.")
            self.warmup_steps = self.warmup_ratio  # transformers 5 reads a float below 1 as a ratio
        _fit_precision_to_hardware(self)
        super().__post_init__()


def _fit_precision_to_hardware(args: TrainingArguments) -> None:
    """Drop (with a warning) what this hardware cannot do, instead of TrainingArguments' hard errors."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_tf32_available

    from gorgon.models.factory import cpu_has_bf16

    if not torch.accelerator.is_available():
        # Trainer must be told it runs on the CPU: for bf16 autocast there, and for DDP over gloo under torchrun.
        args.use_cpu = True
    if args.tf32 and not is_torch_tf32_available():
        log.warning("--tf32: this hardware has no TF32 (an NVIDIA Ampere or newer GPU); ignored")
        args.tf32 = None
    if not (args.bf16 or args.bf16_full_eval):
        return
    if args.use_cpu:
        if not cpu_has_bf16():
            log.warning("--bf16: this CPU has no bfloat16 support; training in float32")
            args.bf16 = args.bf16_full_eval = False
    elif not is_torch_bf16_gpu_available():
        log.warning("--bf16: this GPU has no bfloat16 support; training in float32")
        args.bf16 = args.bf16_full_eval = False


def parse_train_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, MedusaArguments, MedusaTrainingArguments]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (ModelArguments, DataArguments, MedusaArguments, MedusaTrainingArguments), prog="gorgon train"
    )
    model_args, data_args, medusa_args, train_args = parser.parse_args_into_dataclasses(
        args=argv, look_for_args_file=False
    )
    if not data_args.data_path:
        parser.error("--data_path is required (conversations to train on)")
    if not 0 <= data_args.validation_split < 1:
        parser.error("--validation_split must be in [0, 1)")
    return model_args, data_args, medusa_args, train_args


def main(argv: list[str] | None = None) -> int:
    from gorgon.errors import GorgonError

    argv = sys.argv[1:] if argv is None else argv
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model_args, data_args, medusa_args, train_args = parse_train_args(argv)
        from gorgon.training.train_medusa import train_medusa

        train_medusa(model_args, data_args, medusa_args, train_args)
    except (ValueError, GorgonError) as exc:  # configuration errors: one clear sentence, no traceback
        log.error("%s", exc)
        log.debug("details", exc_info=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
