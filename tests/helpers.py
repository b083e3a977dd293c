"""Tiny random models of each family, built from a config inside the tests (no hub)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import torch
import transformers
import uvicorn

from gorgon.config import EngineConfig, ModelConfig
from gorgon.models.llama import LlamaModel

FAMILIES = {
    "llama": {"model_type": "llama", "cls": "LlamaConfig"},
    "mistral": {"model_type": "mistral", "cls": "MistralConfig", "sliding_window": 12},
    "qwen2": {"model_type": "qwen2", "cls": "Qwen2Config"},
    "llama3-rope": {
        "model_type": "llama",
        "cls": "LlamaConfig",
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "yarn-rope": {
        "model_type": "qwen2",
        "cls": "Qwen2Config",
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "tied-mha": {
        "model_type": "llama",
        "cls": "LlamaConfig",
        "tie_word_embeddings": True,
        "num_key_value_heads": 4,
    },
}


def tiny_hf_config(family: str = "llama", **overrides):
    spec = dict(FAMILIES[family])
    cls = getattr(transformers, spec.pop("cls"))
    spec.pop("model_type")
    kwargs = {
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    kwargs.update(spec)
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_hf_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so they are actually tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def gorgon_from_hf(hf_model, dtype: torch.dtype = torch.float32) -> LlamaModel:
    cfg = ModelConfig.from_hf(hf_model.config.to_dict())
    model = LlamaModel(cfg)
    model.load_hf_state_dict(hf_model.state_dict())
    return model.to(dtype).eval()


TINY_TOKENIZER_VOCAB_SIZE = 320  # fits tests/helpers.py's tiny models (vocab_size=320)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?",
    "Gorgon serves language models with speculative decoding.",
    "Once upon a time, there was a tiny model that could.",
    "The sky is blue because of Rayleigh scattering.",
    "def main():\n    print('hello')\n",
    "Héllo wörld, naïve café, 東京.",
]

# BOS, one block per message, then the assistant header when a reply is wanted.
_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_tokenizer(directory):
    """Train a tiny byte-level BPE tokenizer, save it under `directory`, and return it loaded back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_TOKENIZER_VOCAB_SIZE,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


@contextlib.contextmanager
def serve(app, timeout: float = 20.0) -> Iterator[str]:
    """Run `app` under uvicorn on a free 127.0.0.1 port in a thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port before uvicorn starts
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


# Engine limits small enough for fast server tests.
SMALL_CONFIG = EngineConfig(
    max_input_length=64,
    max_total_tokens=128,
    max_batch_total_tokens=1024,
    max_concurrent_requests=8,
    max_stop_sequences=3,
    max_best_of=4,
)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def save_tiny_checkpoint(path, max_positions: int = 512, family: str = "llama"):
    """A tiny random model with the tiny tokenizer saved as a checkpoint directory; returns (tokenizer, model)."""
    tok = build_tiny_tokenizer(path)
    model = tiny_hf_model(
        family,
        vocab_size=len(tok),
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(str(path))
    return tok, model


def make_medusa_adapter(root, name, heads=3, version=2, layers=1, seed=0) -> str:
    """Random Medusa heads (weights ~ N(0, 0.5), so drafts are varied) for the tiny models, saved as
    root/name; returns the directory."""
    from gorgon.adapters.medusa import MedusaConfig, MedusaHeads
    from gorgon.adapters.medusa_io import save_medusa_adapter

    torch.manual_seed(seed)
    cfg = MedusaConfig(num_heads=heads, num_layers=layers, version=version, hidden_size=64, vocab_size=320)
    module = MedusaHeads(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    out = root / name
    save_medusa_adapter(module, out, "tiny")
    return str(out)


@contextlib.contextmanager
def running_engine(path, config):
    """The real `AsyncEngine` on the checkpoint at `path` (float32, CPU) with `config`, started; shut down
    on exit."""
    from gorgon.engine.engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(str(path), dtype="float32", device="cpu", engine_config=config)
    engine.start()
    try:
        yield engine
    finally:
        engine.shutdown()


def save_peft_adapter(hf_model, path, seed: int = 0, std: float = 0.05, **lora_kwargs):
    """A PEFT LoRA on a copy of `hf_model` with random A and B (PEFT starts B at zero, which would test
    nothing), saved under `path`. Returns the PEFT model (the reference) in eval mode."""
    import copy

    import peft

    torch.manual_seed(seed)
    lora_kwargs.setdefault("lora_dropout", 0.0)
    model = peft.get_peft_model(copy.deepcopy(hf_model), peft.LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, std)
    model.save_pretrained(str(path))
    return model.eval()


async def final_tokens(engine, request) -> list[int]:
    """The token ids of `request` run to its end through an `AsyncEngine` (raises its error)."""
    from gorgon.engine.request import FinalOutput

    async for out in engine.generate(request):
        if isinstance(out, FinalOutput):
            return [t.id for t in out.tokens]
    raise AssertionError("no final output")
