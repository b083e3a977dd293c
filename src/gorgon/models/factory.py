"""Build a ready model from a checkpoint, on the requested device and dtype."""

from __future__ import annotations

import logging

import torch

from gorgon.models.llama import LlamaModel
from gorgon.models.rope import RotaryEmbedding

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return device


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` picks the fastest dtype that keeps batch invariance: bfloat16 where the hardware has it."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"Unknown dtype {name!r}: choose one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def build_model(ckpt, dtype: torch.dtype, device: torch.device) -> LlamaModel:
    """Allocate the model without a random init (meta device), then load the checkpoint's weights."""
    from gorgon.models.loader import load_state_dict

    with torch.device("meta"):
        model = LlamaModel(ckpt.config)
    model = model.to_empty(device=device).to(dtype)
    if ckpt.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty() unties parameters
    model.rotary = RotaryEmbedding(ckpt.config.rope, ckpt.config.head_dim, device=device)
    model.load_hf_state_dict(load_state_dict(ckpt.path, dtype, device))
    return model.eval()
