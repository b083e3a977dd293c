"""`gorgon bench --lora-adapters N`: multi-LoRA serving, measured in one run.

The same chat prompts, `--concurrency` at a time: all on the base model, then each request on a different
LoRA adapter (one segmented matmul per target serves them all), and, with a default Medusa adapter, the LoRA
requests with and without speculation. No LoRA adapters for the embedded model can be downloaded here, so the
bench writes random ones in PEFT format (rank `--lora-rank`, all seven projections, small deltas as a
fine-tune has) and loads them through the same loader as requests do. Random adapters move the model away
from what its Medusa heads learned, as a real fine-tune would; the reported speculation speedup is theirs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from gorgon.adapters.lora import load_lora_adapter
from gorgon.bench.prompts import PROMPT_SETS
from gorgon.config import EngineConfig, ModelConfig, SpeculationConfig
from gorgon.engine.llm_engine import LLMEngine
from gorgon.engine.speculation import build_speculator
from gorgon.models.factory import build_model, resolve_device, resolve_dtype

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA target of a Llama-family layer."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def write_random_lora(
    path: Path,
    cfg: ModelConfig,
    rank: int = 16,
    seed: int = 0,
    delta_scale: float = 0.02,
    base_model: str = "",
) -> Path:
    """A random PEFT LoRA on every projection: A ~ N(0, 1/in) rows, B sized so that the delta of a layer's
    output is about `delta_scale` of a unit input's norm."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for target, (fan_in, fan_out) in projection_shapes(cfg).items():
            block = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            tensors[f"{name}.lora_B.weight"] = (
                torch.randn(fan_out, rank, generator=gen) * delta_scale / rank**0.5
            )
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": list(PROJECTIONS),
        "bias": "none",
        "base_model_name_or_path": base_model,
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


def bench_lora(ckpt, dtype_name: str, args: argparse.Namespace) -> dict:
    from gorgon.bench.run import chat_ids, run_engine

    device = resolve_device(args.device)
    dtype = resolve_dtype(dtype_name, device)
    eos = set(ckpt.config.eos_token_ids)
    n = args.concurrency
    texts = PROMPT_SETS[args.prompt_set]
    prompts = [chat_ids(ckpt.tokenizer, texts[i % len(texts)]) for i in range(max(args.prompts, n))]
    model = build_model(ckpt, dtype, device)
    with tempfile.TemporaryDirectory() as tmp:
        loras = [
            load_lora_adapter(
                write_random_lora(Path(tmp) / f"lora{i}", model.config, args.lora_rank, seed=i),
                model.config,
                dtype=dtype,
                device=device,
                adapter_id=f"random-lora-{i}",
            )
            for i in range(args.lora_adapters)
        ]
    per_request = [loras[i % len(loras)] for i in range(len(prompts))]
    plain = LLMEngine(model, ckpt.tokenizer, EngineConfig(), dtype, device, eos)
    run_engine(plain, prompts[:1], 8, 1)  # warm-up
    base = run_engine(plain, prompts, args.max_new_tokens, n)
    mixed = run_engine(plain, prompts, args.max_new_tokens, n, loras=per_request)
    row = {
        "dtype": dtype_name,
        "lora_adapters": len(loras),
        "lora_rank": args.lora_rank,
        f"base_x{n}_tok_s": base["tok_s"],
        f"lora_x{n}_tok_s": mixed["tok_s"],
        "lora_vs_base": mixed["tok_s"] / base["tok_s"],
    }
    if args.adapter_id:
        spec = SpeculationConfig(adapter_id=args.adapter_id, adapter_source=args.adapter_source)
        fast = LLMEngine(
            model,
            ckpt.tokenizer,
            EngineConfig(),
            dtype,
            device,
            eos,
            build_speculator(spec, model, ckpt.model_id, dtype, device),
        )
        run_engine(fast, prompts[:1], 8, 1)
        # Greedy answers to their end (EOS), as in the speculation bench: acceptance on real answers.
        k = args.prompts
        single_plain = run_engine(
            plain, prompts[:k], args.max_new_tokens, 1, ignore_eos=False, loras=per_request
        )
        single_fast = run_engine(
            fast, prompts[:k], args.max_new_tokens, 1, ignore_eos=False, loras=per_request
        )
        batch_fast = run_engine(fast, prompts, args.max_new_tokens, n, ignore_eos=False, loras=per_request)
        batch_plain = run_engine(plain, prompts, args.max_new_tokens, n, ignore_eos=False, loras=per_request)
        stats = fast.speculator.stats
        row |= {
            "lora_single_plain_tok_s": single_plain["tok_s"],
            "lora_single_spec_tok_s": single_fast["tok_s"],
            "lora_single_spec_speedup": single_fast["tok_s"] / single_plain["tok_s"],
            f"lora_x{n}_spec_speedup": batch_fast["tok_s"] / batch_plain["tok_s"],
            "lora_mean_tokens_per_step": stats.mean_tokens_per_step,
            "lora_greedy_outputs_identical": single_plain["outputs"] == single_fast["outputs"],
        }
    return row
