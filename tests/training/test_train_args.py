"""`gorgon train` arguments: the Medusa repository's reference command parses as is, old names map to new ones,
and precision the hardware lacks is dropped with a warning instead of failing."""

from __future__ import annotations

import logging

import pytest
import torch

from gorgon import cli
from gorgon.models.factory import cpu_has_bf16
from gorgon.train import parse_train_args

# The reference command of the Medusa training repository (README), flag for flag.
REFERENCE = [
    "--model_name_or_path", "lmsys/vicuna-7b-v1.3",
    "--data_path", "ShareGPT_Vicuna_unfiltered/ShareGPT_V4.3_unfiltered_cleaned_split.json",
    "--bf16", "True",
    "--output_dir", "test",
    "--num_train_epochs", "2",
    "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8",
    "--gradient_accumulation_steps", "4",
    "--evaluation_strategy", "no",
    "--save_strategy", "no",
    "--learning_rate", "1e-3",
    "--weight_decay", "0.0",
    "--warmup_ratio", "0.1",
    "--lr_scheduler_type", "cosine",
    "--logging_steps", "1",
    "--tf32", "True",
    "--model_max_length", "2048",
    "--lazy_preprocess", "True",
    "--medusa_num_heads", "3",
    "--medusa_num_layers", "1",
]  # fmt: skip

cuda = torch.cuda.is_available()


def test_reference_command_parses(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="gorgon.train"):
        model, data, medusa, args = parse_train_args(REFERENCE)
    assert model.model_name_or_path == "lmsys/vicuna-7b-v1.3" and model.model_id == "lmsys/vicuna-7b-v1.3"
    assert data.data_path.endswith("cleaned_split.json") and data.lazy_preprocess is True
    assert (medusa.medusa_num_heads, medusa.medusa_num_layers, medusa.medusa_version) == (3, 1, 2)
    assert args.model_max_length == 2048 and args.output_dir == "test"
    assert args.num_train_epochs == 2 and args.gradient_accumulation_steps == 4
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (8, 8)
    assert args.eval_strategy == "no" and args.save_strategy == "no"
    assert args.learning_rate == 1e-3 and args.weight_decay == 0.0 and args.logging_steps == 1
    assert args.lr_scheduler_type == "cosine"
    assert args.warmup_steps == 0.1  # transformers 5 reads a fraction below 1 as the old warmup_ratio
    if not cuda:  # no TF32 on a CPU: a warning, not TrainingArguments' error
        assert args.tf32 is None
        assert any("--tf32" in r.getMessage() for r in caplog.records)
        if cpu_has_bf16():  # bf16 autocast on this CPU: Trainer needs to be told it runs there
            assert args.bf16 and args.use_cpu
        else:
            assert not args.bf16 and any("--bf16" in r.getMessage() for r in caplog.records)


def test_defaults_and_new_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, data, medusa, args = parse_train_args(
        ["--data_path", "d.json", "--eval_strategy", "epoch", "--medusa_version", "1", "--output_dir", "o"]
    )
    assert model.model_name_or_path == "embedded" and model.model_id is None  # the embedded default
    assert data.validation_split == 0.05 and medusa.medusa_version == 1
    assert args.eval_strategy == "epoch" and args.keep_best
    _, _, _, args = parse_train_args(["--data_path", "d.json", "--evaluation_strategy", "steps"])
    assert args.eval_strategy == "steps"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--output_dir", "o"], "--data_path is required"),
        (["--data_path", "d", "--medusa_version", "3"], "invalid choice"),
        (["--data_path", "d", "--validation_split", "1.5"], "--validation_split"),
    ],
)
def test_bad_arguments_exit_with_a_message(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        parse_train_args(argv)
    assert message in capsys.readouterr().err


def test_conflicting_old_and_new_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="disagree"):
        parse_train_args(["--data_path", "d", "--evaluation_strategy", "no", "--eval_strategy", "epoch"])
    with pytest.raises(ValueError, match="warmup_ratio"):
        parse_train_args(["--data_path", "d", "--warmup_ratio", "1.5"])


def test_a_training_vocabulary_needs_v2_heads_with_their_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, _, medusa, _ = parse_train_args(["--data_path", "d", "--medusa_train_vocab", "ngrams"])
    assert medusa.medusa_train_vocab == "ngrams"
    assert parse_train_args(["--data_path", "d"])[2].medusa_train_vocab == "full"  # the reference's loss
    for extra in (["--medusa_version", "1"], ["--medusa_ngram_table", "False"]):
        with pytest.raises(ValueError, match="medusa_train_vocab"):
            parse_train_args(["--data_path", "d", "--medusa_train_vocab", "ngrams", *extra])


def test_distillation_share_is_a_fraction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_train_args(["--data_path", "d"])[2].medusa_distill == 0.0  # the reference's loss
    assert parse_train_args(["--data_path", "d", "--medusa_distill", "0.5"])[2].medusa_distill == 0.5
    with pytest.raises(ValueError, match="medusa_distill"):
        parse_train_args(["--data_path", "d", "--medusa_distill", "1.5"])


def test_gorgon_train_hands_its_argv_to_the_trainer_parser(monkeypatch):
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 0

    monkeypatch.setattr("gorgon.train.main", fake_main)
    assert cli.main(["train", *REFERENCE]) == 0
    assert seen["argv"] == REFERENCE
    with pytest.raises(SystemExit):  # other commands still refuse unknown options
        cli.main(["adapter", "info", "x", "--bf16", "True"])


def test_gorgon_train_help_lists_trainer_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--medusa_num_heads", "--data_path", "--evaluation_strategy", "--learning_rate"):
        assert flag in out
