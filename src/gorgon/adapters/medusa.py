"""Medusa heads: the one module that loading, serving, training and export share, so v1 and v2 cannot drift.

A head stacks `num_layers` residual blocks, `ResBlock(x) = x + SiLU(W x + b)`, over the hidden state that feeds
the base model's `lm_head`; head k predicts the token k+2 places ahead. A v1 head ends with its own
`Linear(H, V, bias=False)`; a v2 head (one layer) goes through the base `lm_head`, so a LoRA on `lm_head`
applies to the speculative logits too. Tensor names follow the Medusa training repository (spec/medusa.md):
`{k}.{j}.linear.weight|bias` and, v1 only, `{k}.{L}.weight`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gorgon.kernels.linear import InvariantLinear

SUPPORTED_VERSIONS = (1, 2)


@dataclass(frozen=True)
class MedusaConfig:
    num_heads: int
    num_layers: int
    version: int  # as declared by the adapter's config.json (absent: 1); LoRAX's per-request rule reads it
    hidden_size: int
    vocab_size: int
    base_model_name_or_path: str | None = None
    # Whether the tensors hold per-head LM heads, detected as LoRAX does (v1 if L > 1 or `0.{L}.weight`
    # exists). None: as `version` says. Published adapters exist whose declared version disagrees.
    own_lm_heads: bool | None = None

    def __post_init__(self) -> None:
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(f"Unsupported Medusa version {self.version!r}: Gorgon reads versions 1 and 2.")
        for name in ("num_heads", "num_layers", "hidden_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"Medusa {name} must be at least 1, got {getattr(self, name)}.")

    @property
    def has_own_lm_heads(self) -> bool:
        return self.version == 1 if self.own_lm_heads is None else self.own_lm_heads

    def describe(self) -> str:
        lm = "own LM heads" if self.has_own_lm_heads else "through the base lm_head"
        return f"Medusa v{self.version} ({self.num_heads} heads x {self.num_layers} layer(s), {lm})"


def per_request_problem(version: int, has_own_lm_heads: bool) -> str | None:
    """Why an adapter of this kind cannot be loaded per request (LoRAX's rule), or None if it can."""
    if version < 2:
        return (
            f"Medusa v{version} adapters cannot be loaded per request: start the server with it as the "
            "default adapter (--adapter-id), or use a v2 adapter."
        )
    if has_own_lm_heads:
        return (
            "the adapter declares version 2 but holds per-head LM heads (a v1 layout): it can only be the "
            "default adapter (--adapter-id)."
        )
    return None


def check_per_request(config: MedusaConfig, default: MedusaConfig | None) -> None:
    """Raise ValueError unless `config` may be named by a request, given the server's default adapter."""
    if default is None:
        raise ValueError(
            "Medusa adapters can only be loaded per request when the server was started with a default "
            "Medusa adapter (--adapter-id)."
        )
    problem = per_request_problem(config.version, config.has_own_lm_heads)
    if problem is not None:
        raise ValueError(problem[0].upper() + problem[1:])
    if config.num_heads != default.num_heads:
        raise ValueError(
            f"A Medusa adapter with {config.num_heads} heads cannot be loaded per request: the default "
            f"adapter fixed the number of speculative tokens at {default.num_heads}."
        )


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = InvariantLinear(hidden_size, hidden_size)  # named as in the adapter format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    """K Medusa heads over hidden states [..., H] (usually [N, H]; training passes [B, T, H])."""

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__()
        if not config.has_own_lm_heads and config.num_layers != 1:
            raise ValueError(
                f"Medusa heads without their own LM heads (v2) need exactly one layer, got "
                f"num_layers={config.num_layers}; train v1 heads for deeper stacks."
            )
        self.config = config
        # The adapter's n-gram table when it ships one: it reranks drafts (see speculative/ngram_table).
        self.ngrams = None
        # With a table, v2 heads draft from its tokens only, through a copy of those lm_head rows (serving
        # only; see speculative/draft_vocab).
        self.draft_vocab = None
        k, h, v = config.num_heads, config.hidden_size, config.vocab_size
        if config.has_own_lm_heads:
            # Distinct modules per layer: the reference's `[ResBlock(H)] * n` shares one (a known bug).
            self.blocks = nn.ModuleList(
                nn.Sequential(*(ResBlock(h) for _ in range(config.num_layers))) for _ in range(k)
            )
            self.lm_heads = nn.ModuleList(InvariantLinear(h, v, bias=False) for _ in range(k))
        else:
            # All heads' W stacked as [K*H, H] (rows k*H:(k+1)*H are head k's): one matmul for K heads.
            self.fc = InvariantLinear(h, k * h)

    @property
    def has_own_lm_heads(self) -> bool:
        return self.config.has_own_lm_heads

    def extra_repr(self) -> str:
        return self.config.describe()

    def hidden_states(self, x: torch.Tensor) -> torch.Tensor:
        """Each head's output before any LM head: [..., H] -> [..., K, H]."""
        if self.has_own_lm_heads:
            return torch.stack([blocks(x) for blocks in self.blocks], dim=-2)
        k, h = self.config.num_heads, self.config.hidden_size
        y = F.silu(self.fc(x)).view(*x.shape[:-1], k, h)  # (..., K, H)
        return x.unsqueeze(-2) + y

    def logits(self, x: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Speculative logits [..., K, V] in float32; v2 heads go through `lm_head` in one call on N*K rows."""
        states = self.hidden_states(x)
        if self.has_own_lm_heads:
            out = torch.stack([lm(states[..., i, :]) for i, lm in enumerate(self.lm_heads)], dim=-2)
        else:
            rows = states.reshape(-1, self.config.hidden_size)  # (N*K, H)
            out = _apply_lm_head(lm_head, rows).view(*states.shape[:-1], -1)
        return out.float()

    @classmethod
    def init_for_training(cls, config: MedusaConfig, lm_head_weight: torch.Tensor | None) -> MedusaHeads:
        """Heads as the reference recipe starts them (float32, on CPU; move them after).

        W is zero (each block is x + SiLU(b): the identity plus a constant), b keeps nn.Linear's default
        init, and v1 LM heads start as copies of the base `lm_head_weight` [V, H].
        """
        heads = cls(config)
        with torch.no_grad():
            for linear in heads._block_linears():
                linear.weight.zero_()
            if config.has_own_lm_heads:
                if lm_head_weight is None:
                    raise ValueError(
                        "v1 Medusa heads start as copies of the base lm_head: pass lm_head_weight."
                    )
                expected = (config.vocab_size, config.hidden_size)
                if tuple(lm_head_weight.shape) != expected:
                    raise ValueError(
                        f"lm_head_weight has shape {list(lm_head_weight.shape)}, expected {list(expected)} "
                        "(vocab_size, hidden_size)."
                    )
                for lm in heads.lm_heads:
                    lm.weight.copy_(lm_head_weight)
        return heads

    def state_dict_medusa_format(self) -> dict[str, torch.Tensor]:
        """The weights under the Medusa repository's names (detached; v1 tensors share the parameters')."""
        sd: dict[str, torch.Tensor] = {}
        cfg = self.config
        if self.has_own_lm_heads:
            for k, blocks in enumerate(self.blocks):
                for j, block in enumerate(blocks):
                    sd[f"{k}.{j}.linear.weight"] = block.linear.weight.detach()
                    sd[f"{k}.{j}.linear.bias"] = block.linear.bias.detach()
                sd[f"{k}.{cfg.num_layers}.weight"] = self.lm_heads[k].weight.detach()
            return sd
        h = cfg.hidden_size
        w = self.fc.weight.detach().view(cfg.num_heads, h, h)  # (K, H, H)
        b = self.fc.bias.detach().view(cfg.num_heads, h)
        for k in range(cfg.num_heads):
            # Copies: slices of one storage cannot be saved as separate safetensors entries.
            sd[f"{k}.0.linear.weight"] = w[k].clone()
            sd[f"{k}.0.linear.bias"] = b[k].clone()
        return sd

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.config
        h = cfg.hidden_size
        shapes: dict[str, tuple[int, ...]] = {}
        for k in range(cfg.num_heads):
            for j in range(cfg.num_layers):
                shapes[f"{k}.{j}.linear.weight"] = (h, h)
                shapes[f"{k}.{j}.linear.bias"] = (h,)
            if self.has_own_lm_heads:
                shapes[f"{k}.{cfg.num_layers}.weight"] = (cfg.vocab_size, h)
        return shapes

    @torch.no_grad()
    def load_medusa_format(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy weights named as `state_dict_medusa_format` names them (cast to this module's dtype)."""
        expected = self.expected_shapes()
        missing = sorted(set(expected) - set(sd), key=_natural)
        unexpected = sorted(set(sd) - set(expected), key=_natural)
        if missing or unexpected:
            parts = [
                f"{what} {', '.join(names[:6])}"
                for what, names in (("missing", missing), ("unexpected", unexpected))
                if names
            ]
            raise ValueError(f"Medusa weights do not fit {self.config.describe()}: {'; '.join(parts)}.")
        for name, tensor in sd.items():
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(
                    f"Medusa tensor {name} has shape {list(tensor.shape)}, expected {list(expected[name])} "
                    f"(hidden_size={self.config.hidden_size}, vocab_size={self.config.vocab_size})."
                )
        cfg = self.config
        if self.has_own_lm_heads:
            for k, blocks in enumerate(self.blocks):
                for j, block in enumerate(blocks):
                    block.linear.weight.copy_(sd[f"{k}.{j}.linear.weight"])
                    block.linear.bias.copy_(sd[f"{k}.{j}.linear.bias"])
                self.lm_heads[k].weight.copy_(sd[f"{k}.{cfg.num_layers}.weight"])
            return
        h = cfg.hidden_size
        for k in range(cfg.num_heads):
            self.fc.weight[k * h : (k + 1) * h].copy_(sd[f"{k}.0.linear.weight"])
            self.fc.bias[k * h : (k + 1) * h].copy_(sd[f"{k}.0.linear.bias"])

    def _block_linears(self) -> list[nn.Linear]:
        if self.has_own_lm_heads:
            return [block.linear for blocks in self.blocks for block in blocks]
        return [self.fc]


def _apply_lm_head(lm_head: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    # A frozen InvariantLinear (the served lm_head) takes its kernel path whenever its own weight needs no
    # gradient, which cuts the graph back to the heads; training v2 heads needs the plain matmul.
    if torch.is_grad_enabled() and rows.requires_grad and isinstance(lm_head, nn.Linear):
        return F.linear(rows, lm_head.weight, lm_head.bias)
    return lm_head(rows)


def _natural(name: str) -> tuple:
    # "2.0.linear.weight" before "10.0.linear.weight"
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
