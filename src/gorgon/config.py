"""Frozen configuration dataclasses: the model's shape and the engine's limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    # "default" | "linear" | "dynamic" | "llama3" | "yarn"
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model, read from a HF `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral, where set
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"Unsupported architecture {model_type!r} (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
            )
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        sliding = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            mlp_bias=cfg.get("mlp_bias", False),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters`; older configs use `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind not in ("default", "linear", "dynamic", "llama3", "yarn"):
        raise ValueError(f"Unsupported RoPE scaling type {kind!r}")
    return RopeConfig(
        theta=float(theta),
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(
            params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048))
        ),
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        attention_factor=params.get("attention_factor"),
    )


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the engine (LoRAX launcher names)."""

    max_input_length: int = 1024
    max_total_tokens: int = 2048
    max_batch_prefill_tokens: int = 512
    max_batch_total_tokens: int = 16384
    max_concurrent_requests: int = 128
    max_stop_sequences: int = 4
    max_best_of: int = 2
    # A request's tokens do not depend on its batch (invariant kernels, or BLAS with padded row counts).
    # False only to measure what that costs: plain BLAS calls, no padding.
    batch_invariant: bool = True
    # Time verification steps of several sizes at start, and every decode step while serving, so speculation
    # turns off where it does not pay (False: drafts on every step up to the speculator's max batch size).
    measure_speculation_cost: bool = True
    # Seconds a request may take from admission to its last token (None: no limit); past it, it fails.
    request_timeout: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_input_length >= self.max_total_tokens:
            raise ValueError("--max-input-length must be smaller than --max-total-tokens")
        if self.max_batch_total_tokens < self.max_total_tokens:
            raise ValueError("--max-batch-total-tokens must be at least --max-total-tokens")
        if self.max_batch_prefill_tokens < 1:
            raise ValueError("--max-batch-prefill-tokens must be positive")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError("--request-timeout must be a positive number of seconds")


@dataclass(frozen=True)
class SpeculationConfig:
    """How the engine speculates: with the default Medusa adapter, else n-gram prompt lookup, else not."""

    adapter_id: str | None = None  # default adapter (Medusa); also the default for every request
    adapter_source: str = "hub"  # hub | local
    medusa_tree: str | None = None  # built-in name or JSON file; None: the adapter's own tree, else a chain
    speculative_tokens: int = 0  # n-gram lookup when no Medusa adapter is given
    max_batch_size: int = 32  # decode steps with more sequences run without drafts
    api_token: str | None = None
    # How sampled rows accept drafts: "rejection" keeps the base model's distribution exactly (a draft token
    # is kept iff it is the token drawn there with that position's random number: rejection sampling of
    # one-token proposals, coupled); "typical" is Medusa's faster, lossy typical acceptance.
    speculative_sampling: str = "rejection"
    # Extra tree branch of this many nodes filled by n-gram prompt lookup (0: none). One node by default: on
    # the embedded model it lifted held-out chat from 1.16x to 1.24x and code from 1.12x to 1.24x (one run
    # each); deeper branches accepted more tokens but cost more rows than they saved on this CPU.
    ngram_branch: int = 1

    def __post_init__(self) -> None:
        if self.adapter_source not in ("hub", "local"):
            raise ValueError("--adapter-source must be hub or local")
        if self.speculative_sampling not in ("rejection", "typical"):
            raise ValueError("--speculative-sampling must be rejection or typical")
        if self.speculative_tokens < 0:
            raise ValueError("--speculative-tokens must not be negative")
        if self.max_batch_size < 0:
            raise ValueError("--speculation-max-batch-size must not be negative")
        if self.ngram_branch < 0:
            raise ValueError("--medusa-ngram-branch must not be negative")


@dataclass(frozen=True)
class AdapterConfig:
    """Adapters named by requests (LoRA, or Medusa v2): how many stay loaded and how much memory they may take."""

    max_active_adapters: int = 128  # loaded adapters kept in the LRU cache
    # Share of the device's memory (CPU: RAM) that loaded adapters may take; larger ones are refused.
    memory_fraction: float = 0.1
    preloaded_adapter_ids: tuple[str, ...] = ()  # loaded at start and never evicted
    preloaded_adapter_source: str = "hub"
    # Directories that adapters named by requests with adapter_source=local must lie in (empty: anywhere).
    adapter_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_active_adapters < 1:
            raise ValueError("--max-active-adapters must be at least 1")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError("--adapter-memory-fraction must be in (0, 1]")
