"""Self-distil a tiny model, train Medusa heads on its answers, serve them: speculation with the trained heads
accepts more tokens per step than with untrained ones, and every output equals plain greedy decoding.

A random model's greedy output, in a byte-level BPE, is mostly broken UTF-8 and token splits no tokenizer would
make, so its answers do not survive the text round trip of distillation data. A word-level tokenizer does
(decoding joins words with spaces; encoding splits on them), as a real model's answers mostly do.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from helpers import tiny_hf_model

from gorgon.adapters.medusa import MedusaConfig, MedusaHeads
from gorgon.adapters.medusa_io import save_medusa_adapter
from gorgon.config import EngineConfig, SpeculationConfig
from gorgon.engine.llm_engine import LLMEngine
from gorgon.engine.request import FinalOutput, GenerationRequest, SamplingParams, StoppingParams
from gorgon.engine.speculation import build_speculator
from gorgon.models.factory import build_model
from gorgon.models.loader import resolve_checkpoint
from gorgon.speculative.ngram_table import NGRAM_FILE
from gorgon.train import parse_train_args
from gorgon.training.train_medusa import train_medusa

# Drafts verified on every step (no cost policy), so acceptance is measured on every token.
CONFIG = EngineConfig(
    max_input_length=100, max_total_tokens=200, max_batch_total_tokens=4096, measure_speculation_cost=False
)
WORDS = [f"w{i}" for i in range(300)]
NEW_TOKENS = 40
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads; on a busy 2-core machine, spinning OpenMP threads make every
    op wait milliseconds (generation here: 4 s instead of 0.1 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer: w0..w299, the template's pieces, specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("word_llama")
    tokens = ["<s>", "</s>", "<pad>", "[UNK]", "<|", "|>", "user", "assistant", "system", *WORDS]
    inner = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=inner,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="[UNK]",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(path))
    model = tiny_hf_model(
        "llama", vocab_size=len(tokens), max_position_embeddings=256, bos_token_id=0, eos_token_id=1
    )
    model.save_pretrained(str(path))
    return path


def _prompts(tok, n, seed):
    rng = random.Random(seed)
    users = [" ".join(rng.choice(WORDS) for _ in range(4)) for _ in range(n)]
    texts = [
        tok.apply_chat_template([{"role": "user", "content": u}], add_generation_prompt=True, tokenize=False)
        for u in users
    ]
    return users, [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _generate(engine, prompts):
    outs = [[] for _ in prompts]
    for p, out in zip(prompts, outs):
        engine.add_request(
            GenerationRequest(list(p), SamplingParams(), StoppingParams(NEW_TOKENS, (), True)), out.append
        )
    while engine.has_work():
        engine.step()
    finals = [o[-1] for o in outs]
    assert all(isinstance(f, FinalOutput) for f in finals)
    return [[t.id for t in f.tokens] for f in finals]


def test_trained_heads_speed_up_serving_without_changing_outputs(word_model_dir, tmp_path):
    ckpt = resolve_checkpoint(str(word_model_dir))
    tok, cfg = ckpt.tokenizer, ckpt.config
    model = build_model(ckpt, torch.float32, torch.device("cpu"))
    eos = set(cfg.eos_token_ids)

    def engine(adapter=None):
        spec = None
        if adapter is not None:
            spec_cfg = SpeculationConfig(
                adapter_id=str(adapter), adapter_source="local", medusa_tree="chain-2", max_batch_size=256
            )
            spec = build_speculator(spec_cfg, model, ckpt.model_id, torch.float32, "cpu")
        return LLMEngine(model, tok, CONFIG, torch.float32, torch.device("cpu"), eos, spec), spec

    # 1. Self-distillation: the model's own greedy answers to short chats.
    users, prompts = _prompts(tok, 96, seed=0)
    plain = _generate(engine()[0], prompts)
    assert all(tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids for ids in plain)
    convs = [
        [{"role": "user", "content": u}, {"role": "assistant", "content": tok.decode(ids)}]
        for u, ids in zip(users, plain)
    ]
    (tmp_path / "distilled.json").write_text(json.dumps(convs))

    # 2. Train 2 heads on them.
    argv = [
        "--model_name_or_path", str(word_model_dir),
        "--data_path", str(tmp_path / "distilled.json"),
        "--output_dir", str(tmp_path / "heads"),
        "--num_train_epochs", "20",
        "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-2",
        "--lr_scheduler_type", "constant",
        "--eval_strategy", "epoch",
        "--save_strategy", "no",
        "--logging_steps", "100",
        "--validation_split", "0.1",
        "--feature_dtype", "float32",
        "--medusa_num_heads", "2",
        "--disable_tqdm", "True",
    ]  # fmt: skip
    trained = train_medusa(*parse_train_args(argv)).output_dir

    # Untrained heads, as training starts them, for comparison.
    untrained = tmp_path / "untrained"
    start = MedusaHeads.init_for_training(
        MedusaConfig(2, 1, 2, cfg.hidden_size, cfg.vocab_size), model.lm_head.weight.detach().float()
    )
    save_medusa_adapter(start, untrained, ckpt.model_id)
    # The same untrained heads with the trained adapter's n-gram table of the answers.
    table = trained / NGRAM_FILE
    assert table.is_file() and "gorgon_ngrams.safetensors" in (trained / "README.md").read_text()
    untrained_table = tmp_path / "untrained-table"
    shutil.copytree(untrained, untrained_table)
    shutil.copy(table, untrained_table / NGRAM_FILE)

    # 3. Serve the same prompts and unseen ones with each: outputs are plain greedy's, speed differs.
    _, unseen = _prompts(tok, 16, seed=1)
    plain_unseen = _generate(engine()[0], unseen)
    tokens_per_step = {}
    adapters = {"trained": trained, "untrained": untrained, "untrained+table": untrained_table}
    for name, adapter in adapters.items():
        eng, spec = engine(adapter)
        assert (spec.heads.ngrams is None) == (name == "untrained")
        assert (spec.heads.draft_vocab is None) == (name == "untrained")  # drafts from the table's tokens
        assert _generate(eng, prompts) == plain
        assert _generate(eng, unseen) == plain_unseen
        tokens_per_step[name] = spec.stats.mean_tokens_per_step
    assert tokens_per_step["trained"] > tokens_per_step["untrained"] + 0.2, tokens_per_step
    # The table alone (it knows the root token the heads cannot see) already drafts better than nothing.
    assert tokens_per_step["untrained+table"] > tokens_per_step["untrained"] + 0.1, tokens_per_step
