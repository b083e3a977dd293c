"""Training Medusa heads end to end on a tiny model: the loss falls, the adapter directory is in the Medusa
format and loads back (as `gorgon serve` loads it) with the trained logits, the hub upload holds only the
adapter's files, and `gorgon export --format vllm` writes vLLM's format."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file

from gorgon import cli
from gorgon.adapters.medusa_io import load_medusa_adapter
from gorgon.config import SpeculationConfig
from gorgon.engine.speculation import build_speculator
from gorgon.models.loader import resolve_checkpoint
from gorgon.train import parse_train_args
from gorgon.training.train_medusa import train_medusa


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads; on a busy 2-core machine, spinning OpenMP threads make every
    op wait milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "hello",
    "world",
    "once",
    "upon",
    "a",
    "time",
]


def write_conversations(path, n=36, seed=0):
    """Answers that repeat a phrase and then echo the question: patterns heads can learn fast."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(5))
        convs.append(
            [{"role": "user", "content": q}, {"role": "assistant", "content": "the quick brown fox " * 3 + q}]
        )
    path.write_text(json.dumps(convs))
    return path


def train_argv(model_dir, data, out, *extra):
    return [
        "--model_name_or_path", str(model_dir),
        "--data_path", str(data),
        "--output_dir", str(out),
        "--num_train_epochs", "4",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-2",
        "--lr_scheduler_type", "constant",
        "--logging_steps", "2",
        "--eval_strategy", "epoch",
        "--save_strategy", "no",
        "--validation_split", "0.1",
        "--model_max_length", "128",
        "--feature_dtype", "float32",
        "--disable_tqdm", "True",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["v2", "v1"])
def trained(request, tiny_model_dir, tmp_path_factory):
    version, layers = request.param
    tmp = tmp_path_factory.mktemp(f"medusa_v{version}")
    data = write_conversations(tmp / "data.json")
    argv = train_argv(tiny_model_dir, data, tmp / "out", "--medusa_num_heads", "3")
    argv += ["--medusa_version", str(version), "--medusa_num_layers", str(layers)]
    return train_medusa(*parse_train_args(argv))


def test_training_lowers_the_loss_and_logs_each_head(trained):
    train_logs = [h for h in trained.log_history if "loss" in h]
    eval_logs = [h for h in trained.log_history if "eval_loss" in h]
    assert train_logs[-1]["loss"] < 0.9 * train_logs[0]["loss"]
    assert eval_logs[-1]["eval_loss"] < eval_logs[0]["eval_loss"]
    for k in range(3):
        assert {f"head{k}_loss", f"head{k}_top1"} <= set(train_logs[0])
        assert {f"eval_head{k}_loss", f"eval_head{k}_top1"} <= set(eval_logs[0])
    ev = trained.summary.eval_metrics
    assert ev["head0_top1"] > 0.2 and ev["accepted_per_step"] > 0.1
    # The model is frozen: only the heads were trained, and the base lm_head is not among the parameters.
    names = [n for n, _ in trained.model.named_parameters()]
    assert names and all(n.startswith("heads.") for n in names)


def small_v2_heads(V: int = 40, H: int = 16):
    """(2 fresh v2 heads, the lm_head weight they share) over a V-token vocabulary, seeded."""
    from gorgon.adapters.medusa import MedusaConfig, MedusaHeads

    torch.manual_seed(0)
    lm = torch.randn(V, H)
    heads = MedusaHeads.init_for_training(
        MedusaConfig(num_heads=2, num_layers=1, version=2, hidden_size=H, vocab_size=V), lm
    )
    return heads, lm


def test_a_training_vocabulary_restricts_the_training_softmax_only():
    from gorgon.training.medusa_loss import medusa_loss
    from gorgon.training.train_medusa import MedusaTrainingModel

    V, H = 40, 16
    heads, lm = small_v2_heads(V, H)
    torch.nn.init.normal_(heads.fc.weight, std=0.3)  # not the identity-like start
    vocab = torch.tensor([1, 3, 5, 8, 13, 21, 34])
    outside = torch.tensor([t for t in range(V) if t not in vocab])
    hidden, labels = torch.randn(2, 9, H), outside[torch.randint(0, len(outside), (2, 9))]
    labels[:, :2] = -100
    labels[0, 4], labels[1, 6] = 3, 34  # some labels in the vocabulary, most of them outside it

    model = MedusaTrainingModel(heads, lm, train_vocab=vocab).train()
    index = {int(t): i for i, t in enumerate(vocab)}
    mapped = labels.clone().apply_(lambda t: index.get(t, -100))
    want = medusa_loss(heads, hidden, mapped, lm[vocab])
    got = model(hidden, labels)
    assert torch.equal(got["loss"], want.loss) and torch.equal(got["stats"], want.stats)
    assert got["stats"][:, 2].sum(0).tolist() == [2, 2]  # each head trained on the 2 in-vocabulary labels

    model.eval()  # validation: the whole vocabulary
    full = medusa_loss(heads, hidden, labels, lm)
    got = model(hidden, labels)
    assert torch.equal(got["loss"], full.loss) and torch.equal(got["stats"], full.stats)

    everything = MedusaTrainingModel(heads, lm, train_vocab=torch.arange(V)).train()
    assert torch.equal(everything(hidden, labels)["loss"], full.loss)


def test_distillation_mixes_soft_labels_into_training_only():
    from gorgon.training.medusa_loss import medusa_loss
    from gorgon.training.train_medusa import MedusaTrainingModel

    V, H = 40, 16
    heads, lm = small_v2_heads(V, H)
    hidden, labels = torch.randn(2, 9, H), torch.randint(0, V, (2, 9))
    model = MedusaTrainingModel(heads, lm, distill=0.5).train()
    got = model(hidden, labels)
    want = medusa_loss(heads, hidden, labels, lm, distill=0.5)
    assert torch.equal(got["loss"], want.loss)
    assert not torch.allclose(got["loss"], medusa_loss(heads, hidden, labels, lm).loss)
    model.eval()  # validation figures stay the plain cross-entropy: comparable between runs
    assert torch.equal(model(hidden, labels)["loss"], medusa_loss(heads, hidden, labels, lm).loss)


def test_training_with_distillation_end_to_end(tiny_model_dir, tmp_path):
    data = write_conversations(tmp_path / "data.json")
    argv = train_argv(tiny_model_dir, data, tmp_path / "out", "--medusa_num_heads", "2")
    result = train_medusa(
        *parse_train_args([*argv, "--medusa_train_vocab", "ngrams", "--medusa_distill", "0.5"])
    )
    train_logs = [h for h in result.log_history if "loss" in h]
    assert train_logs[-1]["loss"] < 0.9 * train_logs[0]["loss"]
    assert result.summary.eval_metrics["head0_top1"] > 0.2
    assert "(self-distillation)" in (result.output_dir / "README.md").read_text()


def test_training_over_the_ngram_vocabulary(tiny_model_dir, tmp_path):
    data = write_conversations(tmp_path / "data.json")
    argv = train_argv(tiny_model_dir, data, tmp_path / "out", "--medusa_num_heads", "2")
    result = train_medusa(*parse_train_args([*argv, "--medusa_train_vocab", "ngrams"]))
    train_logs = [h for h in result.log_history if "loss" in h]
    assert train_logs[-1]["loss"] < 0.9 * train_logs[0]["loss"]
    assert result.summary.eval_metrics["head0_top1"] > 0.2  # validated through the whole vocabulary
    # The answers use only WORDS: the table knows every answer token, and far fewer than the vocabulary.
    assert result.summary.train_vocab_coverage == 1.0
    assert result.summary.train_vocab < resolve_checkpoint(str(tiny_model_dir)).config.vocab_size
    assert "training softmax over the n-gram table's" in (result.output_dir / "README.md").read_text()


def test_adapter_directory_loads_back_with_the_trained_logits(trained, tiny_model_dir):
    out = trained.output_dir
    files = {p.name for p in out.iterdir() if p.is_file()}
    assert {"config.json", "medusa_lm_head.safetensors", "README.md"} <= files
    config = json.loads((out / "config.json").read_text())
    heads_cfg = trained.model.heads.config
    assert config == {
        "medusa_num_heads": 3,
        "medusa_num_layers": heads_cfg.num_layers,
        "base_model_name_or_path": str(tiny_model_dir.resolve()),
        "version": heads_cfg.version,
    }
    tensors = load_file(str(out / "medusa_lm_head.safetensors"))
    assert "0.0.linear.weight" in tensors and ("0.2.weight" in tensors) == (heads_cfg.version == 1)

    ckpt = resolve_checkpoint(str(tiny_model_dir))
    cfg = ckpt.config
    loaded = load_medusa_adapter(
        out, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, dtype=torch.float32, device="cpu"
    )
    lm = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
    lm.weight = torch.nn.Parameter(trained.model.lm_head_weight.float(), requires_grad=False)
    x = torch.randn(5, cfg.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.logits(x, lm), trained.model.heads.logits(x, lm), atol=1e-4, rtol=1e-4
        )

    # What `gorgon serve --adapter-id DIR --adapter-source local` does with it.
    from gorgon.models.factory import build_model

    model = build_model(ckpt, torch.float32, torch.device("cpu"))
    spec = build_speculator(
        SpeculationConfig(adapter_id=str(out), adapter_source="local"),
        model,
        ckpt.model_id,
        torch.float32,
        "cpu",
    )
    assert spec.heads.config.num_heads == 3 and spec.tree.depth == 3

    card = (out / "README.md").read_text()
    assert "| 0 | t+2 |" in card and "| 2 | t+4 |" in card and str(trained.summary.steps) in card


def test_gorgon_export_vllm(trained, tmp_path, tiny_model_dir):
    vout = tmp_path / "vllm"
    assert cli.main(["export", "--format", "vllm", str(trained.output_dir), str(vout)]) == 0
    config = json.loads((vout / "config.json").read_text())
    tensors = load_file(str(vout / "model.safetensors"))
    v1 = trained.model.heads.config.version == 1
    assert (
        config["model_type"] == "medusa" and config["num_heads"] == 3 and config["original_lm_head"] is not v1
    )
    assert "blocks.2.layers.0.weight" in tensors and "blocks.0.layers.0.bias" in tensors
    if v1:
        assert {f"lm_heads.{k}.weight" for k in range(3)} <= set(tensors)
    else:  # the base lm_head, loaded from the model the adapter names
        from gorgon.training.features import base_lm_head_weight

        torch.testing.assert_close(tensors["lm_heads.0.weight"], base_lm_head_weight(str(tiny_model_dir)))


def test_push_to_hub_uploads_only_the_adapter_folder(tiny_model_dir, tmp_path, monkeypatch):
    calls = {}

    def fake_create_repo(repo_id, **kwargs):
        calls["created"] = repo_id

    def fake_upload_folder(*, repo_id, folder_path, **kwargs):
        # The staging folder exists only during the call: copy what would be uploaded.
        calls["repo_id"] = repo_id
        shutil.copytree(folder_path, tmp_path / "uploaded")
        return "https://hub/commit/1"

    monkeypatch.setattr("gorgon.training.publish.create_repo", fake_create_repo)
    monkeypatch.setattr("gorgon.training.publish.upload_folder", fake_upload_folder)
    data = write_conversations(tmp_path / "data.json", n=12)
    argv = train_argv(tiny_model_dir, data, tmp_path / "out", "--medusa_num_heads", "2")
    argv += ["--num_train_epochs", "1", "--save_strategy", "epoch", "--push_to_hub", "True"]
    argv += ["--hub_model_id", "me/tiny-medusa"]
    train_medusa(*parse_train_args(argv))
    assert calls["created"] == calls["repo_id"] == "me/tiny-medusa"
    uploaded = tmp_path / "uploaded"
    assert sorted(p.name for p in uploaded.rglob("*")) == [
        "README.md",
        "config.json",
        "medusa_lm_head.safetensors",
    ]
    assert any(p.name.startswith("checkpoint-") for p in (tmp_path / "out").iterdir())  # kept local
    cfg = resolve_checkpoint(str(tiny_model_dir)).config
    heads = load_medusa_adapter(
        uploaded, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, dtype=torch.float32, device="cpu"
    )
    assert heads.config.num_heads == 2 and heads.config.version == 2


def test_cli_runs_the_reference_style_command(tiny_model_dir, tmp_path):
    data = write_conversations(tmp_path / "data.json", n=10)
    argv = [
        "train",
        "--model_name_or_path", str(tiny_model_dir),
        "--data_path", str(data),
        "--bf16", "True",
        "--output_dir", str(tmp_path / "out"),
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "2",
        "--evaluation_strategy", "no",
        "--save_strategy", "no",
        "--learning_rate", "1e-3",
        "--weight_decay", "0.0",
        "--warmup_ratio", "0.1",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "1",
        "--tf32", "True",
        "--model_max_length", "128",
        "--lazy_preprocess", "True",
        "--medusa_num_heads", "2",
        "--medusa_num_layers", "1",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["medusa_num_heads"] == 2
    assert cli.main(["train", "--data_path", str(tmp_path / "missing.json"), "--output_dir", "x"]) == 2
