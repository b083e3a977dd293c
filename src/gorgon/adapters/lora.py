"""PEFT LoRA adapters read into Gorgon's layout: per decoder layer, per projection, A, B transposed and scale.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors` (or the legacy pickle
`adapter_model.bin`, only ever opened with `torch.load(weights_only=True)`). PEFT adds `scale * B(A(x))` to a
Linear's output, with scale = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), r and alpha per module
(`rank_pattern`, `alpha_pattern`). Gorgon's projections are fused (qkv, gate_up), so the weights are kept per
target name and `gorgon.models.lora_batch` adds each target's delta to its columns of the fused output.

The tensors in the file decide which modules have LoRA (not `target_modules` nor `layers_to_transform`), and
their shapes are checked against the model. The config's features that change the forward pass in ways
Gorgon does not implement (DoRA, trained biases, full module copies, ...) are refused. Every problem a user
can cause is one ValueError sentence naming the adapter and the field or tensor to look at.
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gorgon.adapters.lora_config import TARGETS, LoraConfig
from gorgon.adapters.medusa_io import LORA_CONFIG_FILE, read_specs, same_model_name
from gorgon.config import ModelConfig

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"

_BLOCKS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
# PEFT saves `base_model.model.<module>.lora_A.weight`; older files keep the adapter name
# (`lora_A.default.weight`). Anything else in the file is not a LoRA weight Gorgon can apply.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# LoRA on an Embedding (embed_tokens): named apart, and never supported.
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_[AB](?:\.[^.]+)?$")
# The module inside the wrapped model: a CausalLM (`model.layers...`) or, wrapped bare, a LlamaModel.
_LAYER_MODULE = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>\d+)\.(?P<block>\w+)\.(?P<target>\w+)$"
)
_LM_HEAD_MODULE = re.compile(r"^(?:base_model\.model\.)?lm_head$")
# When lm_head (or embed_tokens) is a target, PEFT also saves the frozen base weight it wraps,
# `base_model.model.lm_head.base_layer.weight`: a copy of the model's own lm_head, never read (only its
# shape is checked). Without `base_layer` the file holds a full embed_tokens/lm_head of its own (PEFT saves
# them when the vocabulary was resized, or with save_embedding_layers=True): LoRA serving cannot honour it.
_BASE_COPY = re.compile(r"^(?P<module>.+)\.base_layer\.weight$")
_FULL_COPY = re.compile(r"^(?:.+\.)?(?P<module>embed_tokens|lm_head)\.weight$")


@dataclass
class LoraWeight:
    a: torch.Tensor  # [r, in_features], contiguous, serving dtype/device
    b_t: torch.Tensor  # [r, out_features] = lora_B.weight transposed, contiguous, serving dtype/device
    scale: float  # alpha/r (rsLoRA alpha/sqrt(r)) with the module's own r/alpha (rank_pattern/alpha_pattern)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b_t))


@dataclass
class LoraAdapter:
    adapter_id: str
    config: LoraConfig
    # Per decoder layer: target name ("q_proj", ...) -> weight; a target absent from a layer has no LoRA.
    layers: list[dict[str, LoraWeight]]
    lm_head: LoraWeight | None
    nbytes: int  # bytes of all tensors held

    def targets(self) -> set[str]:
        """The targets that have LoRA in at least one layer."""
        found = {target for layer in self.layers for target in layer}
        return (found | {"lm_head"}) if self.lm_head is not None else found


@dataclass(frozen=True)
class _Module:
    """Where a LoRA module sits in Gorgon's model: layer index (None for lm_head) and target name."""

    layer: int | None
    target: str
    key: str  # its name in the wrapped model, as PEFT matches rank_pattern/alpha_pattern against it

    @property
    def order(self) -> tuple[float, int]:
        return (self.layer if self.layer is not None else math.inf, TARGETS.index(self.target))

    @property
    def label(self) -> str:  # how errors name it (the file's keys are longer, but this is what users know)
        if self.layer is None:
            return "lm_head"
        block = next(b for b, targets in _BLOCKS.items() if self.target in targets)
        return f"layers.{self.layer}.{block}.{self.target}"


def is_lora_dir(path: str | Path) -> bool:
    return (Path(path) / LORA_CONFIG_FILE).is_file()


def lora_weights_file(path: str | Path, name: str | None = None) -> Path:
    """The adapter's weights: safetensors first, the legacy pickle only when there is no safetensors file."""
    path = Path(path)
    for file in (path / WEIGHTS_FILE, path / LEGACY_WEIGHTS_FILE):
        if file.is_file():
            return file
    raise ValueError(
        f"LoRA adapter {name or path} has no weights: expected {WEIGHTS_FILE} (or a legacy "
        f"{LEGACY_WEIGHTS_FILE}) next to {LORA_CONFIG_FILE}."
    )


def lora_nbytes_on_disk(path: str | Path) -> int:
    """Size of the weight file, to refuse an adapter over a memory budget before loading it.

    Less the frozen lm_head copy PEFT saves next to a LoRA on lm_head (see _BASE_COPY): it is never loaded,
    and can be far larger than the adapter. A header that cannot be read counts the whole file (loading the
    adapter then says what is wrong with it)."""
    file = lora_weights_file(path)
    size = file.stat().st_size
    if file.suffix != ".safetensors":
        return size
    from safetensors import SafetensorError

    try:
        specs = read_specs([file])
    except (SafetensorError, OSError, ValueError):
        return size
    return size - sum(s.nbytes for key, s in specs.items() if _BASE_COPY.match(key))


def load_lora_adapter(
    path: str | Path,
    model_config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    adapter_id: str | None = None,
    model_id: str | None = None,
) -> LoraAdapter:
    """The LoRA adapter in `path`, checked against `model_config`, in `dtype` on `device`."""
    path = Path(path)
    name = adapter_id or str(path)
    config = LoraConfig.from_file(path, name=name)
    base = config.base_model_name_or_path
    if model_id and base and not same_model_name(base, model_id):
        logger.warning(
            "LoRA adapter %s was trained on %s, not %s: shapes fit, but its quality may suffer",
            name,
            base,
            model_id,
        )
    tensors, base_copies = _read_weights(lora_weights_file(path, name), name)
    _check_base_copies(base_copies, model_config, name)
    pairs = _pair_tensors(tensors, name)
    layers: list[dict[str, LoraWeight]] = [{} for _ in range(model_config.num_layers)]
    lm_head = None
    for module, (lora_a, lora_b) in pairs.items():
        _check_shapes(module, lora_a, lora_b, model_config, name)
        weight = _to_weight(module, lora_a, lora_b, config, dtype, device, name)
        if module.layer is None:
            lm_head = weight
        else:
            layers[module.layer][module.target] = weight
    nbytes = sum(w.nbytes for layer in layers for w in layer.values()) + (lm_head.nbytes if lm_head else 0)
    adapter = LoraAdapter(name, config, layers, lm_head, nbytes)
    logger.info(
        "Loaded LoRA adapter %s: rank %d, targets %s, %d bytes",
        name,
        config.rank,
        ", ".join(t for t in TARGETS if t in adapter.targets()),
        nbytes,
    )
    return adapter


# --- adapter_config.json ---------------------------------------------------------------------------------


def _read_weights(file: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """The file's tensors on CPU in their stored dtype, and the shapes of the base-layer copies (unread)."""
    if file.suffix == ".safetensors":
        return _read_safetensors(file, name)
    tensors = _read_pickle(file, name)
    copies = {k: tuple(t.shape) for k, t in tensors.items() if _BASE_COPY.match(k)}
    return {k: t for k, t in tensors.items() if k not in copies}, copies


def _read_safetensors(file: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    from safetensors import SafetensorError, safe_open

    tensors, copies = {}, {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            for key in fh.keys():  # noqa: SIM118 -- safe_open handles are not iterable
                if _BASE_COPY.match(key):
                    copies[key] = tuple(fh.get_slice(key).get_shape())
                else:
                    tensors[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"LoRA adapter {name}: {file.name} is corrupt or truncated ({_first_line(e)}); download it again."
        ) from e
    return tensors, copies


def _read_pickle(file: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"LoRA adapter {name}: refusing to load {file.name}, it pickles objects other than tensors "
            f"(convert it to {WEIGHTS_FILE})."
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ValueError(
            f"LoRA adapter {name}: {file.name} is corrupt or truncated ({_first_line(e)}); download it again."
        ) from e
    if not isinstance(data, dict) or not all(isinstance(t, torch.Tensor) for t in data.values()):
        raise ValueError(f"LoRA adapter {name}: {file.name} does not hold a flat dict of tensors.")
    return data


def _pair_tensors(
    tensors: dict[str, torch.Tensor], name: str
) -> dict[_Module, tuple[torch.Tensor, torch.Tensor]]:
    """lora_A and lora_B of every module in the file, each module found by its name."""
    sides: dict[_Module, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        if embedding := _EMBEDDING_KEY.match(key):
            _module(embedding["module"], key, name)  # raises: embeddings are not a target
        if full := _FULL_COPY.match(key):
            raise ValueError(
                f"LoRA adapter {name} holds a full {full['module']} ({key}), saved by PEFT when the "
                "vocabulary was resized or with save_embedding_layers=True: Gorgon serves LoRA weights only "
                "(save the adapter with save_embedding_layers=False if the vocabulary is the base model's)."
            )
        match = _LORA_KEY.match(key)
        if match is None:
            raise ValueError(
                f"LoRA adapter {name} holds {key}, which is not a LoRA weight (lora_A/lora_B of "
                f"{', '.join(TARGETS)}): Gorgon cannot serve it."
            )
        module = _module(match["module"], key, name)
        side = f"lora_{match['side']}"
        if side in sides.setdefault(module, {}):
            raise ValueError(
                f"LoRA adapter {name} holds two {side} tensors for {module.label} "
                f"({sides[module][side][0]} and {key}): one adapter per directory."
            )
        sides[module][side] = (key, tensor)
    if not sides:
        raise ValueError(f"LoRA adapter {name} holds no LoRA weights.")
    pairs = {}
    # In model order, so that the first problem reported is the first a user would look at (layers.0 q_proj).
    for module, found in sorted(sides.items(), key=lambda item: item[0].order):
        for side, other in (("lora_A", "lora_B"), ("lora_B", "lora_A")):
            if other not in found:
                raise ValueError(
                    f"LoRA adapter {name} has {module.label}.{side} ({found[side][0]}) without its {other}: "
                    "the file is incomplete."
                )
        pairs[module] = (found["lora_A"][1], found["lora_B"][1])
    return pairs


def _check_base_copies(copies: dict[str, tuple[int, ...]], cfg: ModelConfig, name: str) -> None:
    """The frozen base weights PEFT saved next to a LoRA on lm_head must be this model's lm_head's shape."""
    for key, shape in copies.items():
        module = _module(_BASE_COPY.match(key)["module"], key, name)
        if module.layer is not None:  # PEFT saves only embedding layers this way
            raise ValueError(
                f"LoRA adapter {name} holds {key}, a copy of a base weight: Gorgon serves LoRA weights only."
            )
        if shape != (want := (cfg.vocab_size, cfg.hidden_size)):
            raise ValueError(
                f"LoRA adapter {name} was trained for another base model (or a resized vocabulary): "
                f"lm_head.base_layer.weight has shape {shape}, this model expects {want}."
            )


def _module(path: str, key: str, name: str) -> _Module:
    """The Gorgon module a PEFT module name (`base_model.model.model.layers.0.self_attn.q_proj`) is."""
    wrapped = path.removeprefix("base_model.model.")
    if _LM_HEAD_MODULE.match(path):
        return _Module(None, "lm_head", wrapped)
    match = _LAYER_MODULE.match(path)
    if match and match["target"] in _BLOCKS.get(match["block"], ()):
        return _Module(int(match["layer"]), match["target"], wrapped)
    raise ValueError(
        f"LoRA adapter {name} has LoRA on {wrapped} ({key}); Gorgon applies LoRA to {', '.join(TARGETS)} "
        "of a Llama-family model only."
    )


def _expected_io(target: str, cfg: ModelConfig) -> tuple[int, int]:
    """(in_features, out_features) of a target in this model."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (cfg.hidden_size, q),
        "k_proj": (cfg.hidden_size, kv),
        "v_proj": (cfg.hidden_size, kv),
        "o_proj": (q, cfg.hidden_size),
        "gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "down_proj": (cfg.intermediate_size, cfg.hidden_size),
        "lm_head": (cfg.hidden_size, cfg.vocab_size),
    }[target]


def _check_shapes(
    module: _Module, lora_a: torch.Tensor, lora_b: torch.Tensor, cfg: ModelConfig, name: str
) -> None:
    label = module.label
    if module.layer is not None and module.layer >= cfg.num_layers:
        raise ValueError(
            f"LoRA adapter {name} was trained for another base model: it has weights for {label}, this model "
            f"has {cfg.num_layers} layers."
        )
    for side, t in (("lora_A", lora_a), ("lora_B", lora_b)):
        if t.dim() != 2 or t.numel() == 0:
            raise ValueError(
                f"LoRA adapter {name}: {label}.{side} has shape {tuple(t.shape)}, not a 2-D matrix."
            )
        if not t.is_floating_point():
            raise ValueError(
                f"LoRA adapter {name}: {label}.{side} has dtype {t.dtype}, not a floating point one."
            )
    rank = lora_a.shape[0]
    if lora_b.shape[1] != rank:
        raise ValueError(
            f"LoRA adapter {name}: {label}.lora_B has shape {tuple(lora_b.shape)} but {label}.lora_A has "
            f"rank {rank}: the file is inconsistent."
        )
    n_in, n_out = _expected_io(module.target, cfg)
    for side, t, want in (("lora_A", lora_a, (rank, n_in)), ("lora_B", lora_b, (n_out, rank))):
        if tuple(t.shape) != want:
            raise ValueError(
                f"LoRA adapter {name} was trained for another base model: {label}.{side} has shape "
                f"{tuple(t.shape)}, this model expects {want}."
            )


def _to_weight(
    module: _Module,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    config: LoraConfig,
    dtype: torch.dtype,
    device: torch.device | str,
    name: str,
) -> LoraWeight:
    rank = lora_a.shape[0]
    if rank != (declared := config.rank_for(module.key)):
        # PEFT itself would refuse the file; the tensors are what was trained, so they win.
        logger.warning(
            "LoRA adapter %s: %s has rank %d, its config says %d; using %d",
            name,
            module.label,
            rank,
            declared,
            rank,
        )
    return LoraWeight(
        a=lora_a.to(device=device, dtype=dtype).contiguous(),
        b_t=lora_b.to(device=device, dtype=dtype).T.contiguous(),
        scale=config.scale(module.key, rank),
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
