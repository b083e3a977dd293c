"""Adapter directories built by hand, in the formats other tools write (no Gorgon code involved)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

H, V = 32, 100


def reference_tensors(num_heads: int, num_layers: int, own_lm_heads: bool, seed: int = 0) -> dict:
    """Tensors named as the Medusa training repository saves them."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k in range(num_heads):
        for j in range(num_layers):
            sd[f"{k}.{j}.linear.weight"] = torch.randn(H, H, generator=g) * 0.2
            sd[f"{k}.{j}.linear.bias"] = torch.randn(H, generator=g) * 0.2
        if own_lm_heads:
            sd[f"{k}.{num_layers}.weight"] = torch.randn(V, H, generator=g) * 0.2
    return sd


def write_reference_adapter(
    path: Path,
    *,
    num_heads: int = 3,
    num_layers: int = 1,
    own_lm_heads: bool = False,
    version=None,  # None: no version key (as the Medusa repository writes)
    config_heads: int | None = None,
    weights: str = "medusa_lm_head.safetensors",
    base: str = "org/tiny-llama",
) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    sd = reference_tensors(num_heads, num_layers, own_lm_heads)
    config = {
        "base_model_name_or_path": base,
        "medusa_num_heads": config_heads or num_heads,
        "medusa_num_layers": num_layers,
        "transformers_version": "4.36.2",
    }
    if version is not None:
        config["version"] = version
    (path / "config.json").write_text(json.dumps(config))
    if weights.endswith(".pt"):
        torch.save(sd, path / weights)
    else:
        save_file(sd, str(path / weights))
    return sd


def write_lora_adapter(path: Path, rank: int = 4, hidden: int = H) -> None:
    """A PEFT LoRA on q_proj/v_proj of a 2-layer model (v_proj is GQA: 16 outputs)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "org/tiny-llama",
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    sd = {}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn"
        sd[f"{prefix}.q_proj.lora_A.weight"] = torch.zeros(rank, hidden)
        sd[f"{prefix}.q_proj.lora_B.weight"] = torch.zeros(hidden, rank)
        sd[f"{prefix}.v_proj.lora_A.weight"] = torch.zeros(rank, hidden)
        sd[f"{prefix}.v_proj.lora_B.weight"] = torch.zeros(16, rank)
    save_file(sd, str(path / "adapter_model.safetensors"))
