"""The Llama family (Llama, Mistral, Qwen2) as a plain PyTorch module.

Tokens of all sequences in a step are laid out flat ([T] rows); attention finds each sequence's rows and
keys through `AttentionMetadata`. Projections are fused (qkv, gate+up) for speed; `load_hf_state_dict`
maps HF tensor names onto them.
"""

from __future__ import annotations

from itertools import islice

import torch
import torch.nn.functional as F
from torch import nn

from gorgon.config import ModelConfig
from gorgon.kernels.build import cpu_extension
from gorgon.kernels.linear import InvariantLinear as Linear
from gorgon.models.attention import AttentionMetadata, paged_attention
from gorgon.models.lora_batch import LoraBatch
from gorgon.models.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def add_norm(
    x: torch.Tensor | None, residual: torch.Tensor, norm: RMSNorm, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x, then norm(residual). Returns (normed, residual); the fused kernel updates in place."""
    if fused:
        return cpu_extension().add_rms_norm(x, residual, norm.weight, norm.eps), residual
    if x is not None:
        residual = residual + x
    return norm(residual), residual


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv) * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, qkv_out, bias=cfg.attention_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        T = x.shape[0]
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x)
        if lora is not None:
            lora.apply(self.layer, "q_proj", x, qkv, 0)
            lora.apply(self.layer, "k_proj", x, qkv, nh * d)
            lora.apply(self.layer, "v_proj", x, qkv, (nh + nkv) * d)
        k_cache, v_cache = kv
        if meta.use_kernel:  # rotary q/k, float32 q, k/v into the cache: one fused call
            q = cpu_extension().rope_store(qkv, *cos_sin, k_cache, v_cache, meta.write_slots, nh, nkv, d)
        else:
            # q and k sit side by side in the fused projection: one rotary call serves both (float32 out).
            qk = apply_rotary(qkv[:, : (nh + nkv) * d].view(T, nh + nkv, d), *cos_sin)
            q, k = qk[:, :nh], qk[:, nh:]
            v = qkv[:, (nh + nkv) * d :].view(T, nkv, d)
            k_cache[meta.write_slots] = k.to(k_cache.dtype)
            v_cache[meta.write_slots] = v.to(v_cache.dtype)
        out = paged_attention(q, k_cache, v_cache, meta)  # (T, nh, d) float32
        out = out.reshape(T, nh * d).to(x.dtype)
        y = self.o_proj(out)
        if lora is not None:
            lora.apply(self.layer, "o_proj", out, y)
        return y


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, lora: LoraBatch | None = None, fused: bool = False) -> torch.Tensor:
        """`fused`: silu(gate) * up in one kernel call (the kernel path), else two PyTorch ops."""
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            lora.apply(self.layer, "gate_proj", x, gate_up, 0)
            lora.apply(self.layer, "up_proj", x, gate_up, self.intermediate)
        if fused:
            act = cpu_extension().silu_mul(gate_up)
        else:
            gate, up = gate_up.split(self.intermediate, dim=-1)
            act = F.silu(gate) * up
        y = self.down_proj(act)
        if lora is not None:
            lora.apply(self.layer, "down_proj", act, y)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, layer)

    def forward(self, h, residual, cos_sin, kv, meta, lora=None) -> tuple[torch.Tensor, torch.Tensor]:
        """h: this layer's normed input. Returns (the MLP's output, the residual stream); the next norm adds
        the former to the latter (fused with it on the kernel path)."""
        attn = self.self_attn(h, cos_sin, kv, meta, lora)
        h, residual = add_norm(attn, residual, self.post_attention_layernorm, meta.use_kernel)
        return self.mlp(h, lora, meta.use_kernel), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """Returns the final hidden states [T, hidden] (after the last norm): what feeds lm_head. `lora`: the
        step's LoRA adapters per row (None: base model only)."""
        fused = meta.use_kernel
        residual = self.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions)
        h, residual = add_norm(None, residual, self.layers[0].input_layernorm, fused)
        # islice, not self.layers[1:]: slicing a ModuleList builds a new one every step.
        norms = [layer.input_layernorm for layer in islice(self.layers, 1, None)] + [self.norm]
        for layer, kv, next_norm in zip(self.layers, kv_cache, norms):
            out, residual = layer(h, residual, cos_sin, kv, meta, lora)
            h, residual = add_norm(out, residual, next_norm, fused)
        return h

    def logits(self, hidden: torch.Tensor, lora: LoraBatch | None = None) -> torch.Tensor:
        y = self.lm_head(hidden)
        if lora is not None:
            lora.apply_lm_head(hidden, y)
        return y.float()

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy HF-named weights (model.layers.N.self_attn.q_proj.weight, ...) into the fused layout."""
        own = self.state_dict()
        fused = _fuse_hf_names(sd, self.config.num_layers)
        if self.config.tie_word_embeddings:
            fused.pop("lm_head.weight", None)
        for name, tensor in fused.items():
            if name not in own:
                raise ValueError(f"Unexpected weight {name!r} in checkpoint")
            if own[name].shape != tensor.shape:
                raise ValueError(
                    f"Weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)
        missing = set(own) - set(fused) - ({"lm_head.weight"} if self.config.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"Checkpoint lacks weights: {', '.join(sorted(missing)[:5])}")


_FUSED = {
    "self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "mlp": ("gate_up_proj", ("gate_proj", "up_proj")),
}


def _fuse_hf_names(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """HF names -> this module's names; q/k/v and gate/up are concatenated along the output dim."""
    parts_of_fused = {f"{block}.{p}" for block, (_, parts) in _FUSED.items() for p in parts}
    out = {}
    for name, tensor in sd.items():
        key = name.removeprefix("model.")
        pieces = key.split(".")
        if name.endswith("rotary_emb.inv_freq") or ".".join(pieces[2:4]) in parts_of_fused:
            continue
        out[key] = tensor
    for i in range(num_layers):
        for block, (fused_name, parts) in _FUSED.items():
            for kind in ("weight", "bias"):
                tensors = [sd.get(f"model.layers.{i}.{block}.{p}.{kind}") for p in parts]
                if all(t is not None for t in tensors):
                    out[f"layers.{i}.{block}.{fused_name}.{kind}"] = torch.cat(tensors)
    return out
