"""Medusa adapter directories: read (current and legacy formats), write, export to vLLM, inspect.

A directory is a Medusa adapter when its `config.json` has `medusa_num_heads` (spec/medusa.md). Weights are
`medusa_lm_head.safetensors`, else every root-level `*.safetensors` (as LoRAX reads them), else the legacy
pickle `medusa_lm_head.pt`, which is only ever opened with `torch.load(weights_only=True)`. What the tensors
hold decides the layout (head count, layers, per-head LM heads); the config's claims are checked against them
and disagreements are logged. Every problem a user can cause is a ValueError naming what to fix.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gorgon.adapters.medusa import MedusaConfig, MedusaHeads
from gorgon.speculative.ngram_table import NGRAM_FILE

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "medusa_lm_head.safetensors"
LEGACY_WEIGHTS_FILE = "medusa_lm_head.pt"
LORA_CONFIG_FILE = "adapter_config.json"
VLLM_WEIGHTS_FILE = "model.safetensors"

# {k}.{j}.linear.weight|bias (residual blocks) and {k}.{L}.weight (v1 LM heads)
MEDUSA_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")
_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}  # others: 1 byte


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...
    nbytes: int


@dataclass(frozen=True)
class MedusaLayout:
    """What an adapter's tensors hold."""

    num_heads: int
    num_layers: int
    own_lm_heads: bool
    hidden_size: int
    vocab_size: int | None  # known only from per-head LM heads


def is_medusa_dir(path: str | Path) -> bool:
    try:
        return "medusa_num_heads" in _read_json(Path(path) / CONFIG_FILE, missing_ok=True)
    except ValueError:  # unreadable config.json: not something we can call a Medusa adapter
        return False


def read_medusa_config(path: Path) -> dict[str, Any]:
    config = _read_json(path / CONFIG_FILE, missing_ok=True)
    if "medusa_num_heads" not in config:
        raise ValueError(f"{path} is not a Medusa adapter: no {CONFIG_FILE} with medusa_num_heads.")
    return config


def parse_version(value: Any) -> int:
    """The config's `version` ("2", 2 or 2.0; absent means 1) as 1 or 2."""
    if value is None:
        return 1
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Medusa config version {value!r} is not a number (expected 1 or 2).") from None
    if number not in (1.0, 2.0):
        raise ValueError(f"Unsupported Medusa version {value!r}: Gorgon reads versions 1 and 2.")
    return int(number)


# Files Gorgon keeps next to the heads (drafting aids other servers ignore): never read as weights.
GORGON_EXTRA_FILES = (NGRAM_FILE,)


def medusa_weight_files(path: Path) -> list[Path]:
    preferred = path / WEIGHTS_FILE
    if preferred.is_file():
        return [preferred]
    files = sorted(f for f in path.glob("*.safetensors") if f.name not in GORGON_EXTRA_FILES)
    if files:
        return files
    if (path / LEGACY_WEIGHTS_FILE).is_file():
        return [path / LEGACY_WEIGHTS_FILE]
    raise ValueError(
        f"No Medusa weights in {path}: expected {WEIGHTS_FILE} (or *.safetensors, or a legacy .pt)."
    )


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the files, on CPU in its stored dtype; pickles only through weights_only."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            part = load_file(str(f), device="cpu")
        else:
            try:
                part = torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(
                    f"Refusing to load {f}: it pickles objects other than tensors (convert it to safetensors)."
                ) from e
            if not isinstance(part, dict) or not all(isinstance(t, torch.Tensor) for t in part.values()):
                raise ValueError(f"{f} does not hold a flat dict of tensors.")
        tensors.update(part)
    return tensors


def read_specs(files: list[Path]) -> dict[str, TensorSpec]:
    """Shapes and dtypes without reading safetensors data (pickles must be loaded, weights_only)."""
    from safetensors import safe_open

    specs: dict[str, TensorSpec] = {}
    for f in files:
        if f.suffix != ".safetensors":
            for name, t in read_tensors([f]).items():
                dtype = _SAFETENSORS_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))
                specs[name] = TensorSpec(tuple(t.shape), dtype, t.numel() * t.element_size())
            continue
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():  # noqa: SIM118 -- safe_open handles are not iterable
                sl = fh.get_slice(name)
                shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                specs[name] = TensorSpec(shape, dtype, math.prod(shape) * _ITEMSIZE.get(dtype, 1))
    return specs


def detect_layout(
    shapes: dict[str, tuple[int, ...]], config: dict[str, Any], where: Path, warn: bool = True
) -> tuple[MedusaLayout, list[str]]:
    """The layout the tensors hold (LoRAX's rule: v1 if L > 1 or `0.{L}.weight` exists), plus notes on where
    the config disagrees with them (logged as warnings unless `warn` is False)."""
    heads = sorted(
        {int(m[1]) for m in map(MEDUSA_KEY.match, shapes) if m and m[2] == "0" and m[3] == "linear.weight"}
    )
    if not heads:
        raise ValueError(f"No Medusa head tensors ({{k}}.{{j}}.linear.weight) in {where}.")
    if heads != list(range(len(heads))):
        raise ValueError(f"Medusa heads in {where} are not numbered 0..K-1: found {heads}.")
    num_heads = len(heads)
    num_layers = 0
    while f"0.{num_layers}.linear.weight" in shapes:
        num_layers += 1
    own = f"0.{num_layers}.weight" in shapes
    if num_layers > 1 and not own:
        raise ValueError(
            f"Medusa adapter {where} has {num_layers} layers per head but no per-head LM heads "
            f"(0.{num_layers}.weight): v2 heads have exactly one layer, v1 heads need their LM heads."
        )
    hidden = shapes["0.0.linear.weight"][-1]
    notes = []
    for key, found in (("medusa_num_heads", num_heads), ("medusa_num_layers", num_layers)):
        declared = config.get(key)
        if declared != found:
            notes.append(f"config.json says {key}={declared} but the tensors hold {found}; using {found}")
    for note in notes if warn else ():
        logger.warning("Medusa adapter %s: %s", where, note)
    vocab = shapes[f"0.{num_layers}.weight"][0] if own else None
    return MedusaLayout(num_heads, num_layers, own, hidden, vocab), notes


def load_medusa_adapter(
    path: Path,
    *,
    hidden_size: int,
    vocab_size: int,
    dtype: torch.dtype,
    device: torch.device | str,
    model_id: str | None = None,
) -> MedusaHeads:
    """The adapter in `path` as MedusaHeads for a model of this hidden and vocabulary size (eval mode)."""
    path = Path(path)
    raw = read_medusa_config(path)
    version = parse_version(raw.get("version"))
    tensors = {n: t for n, t in read_tensors(medusa_weight_files(path)).items() if MEDUSA_KEY.match(n)}
    layout, _ = detect_layout({n: tuple(t.shape) for n, t in tensors.items()}, raw, path)
    base = raw.get("base_model_name_or_path")
    fit = f" (trained on {base})" if base else ""
    if layout.hidden_size != hidden_size:
        raise ValueError(
            f"Medusa adapter {path}{fit} has hidden size {layout.hidden_size} but the model has "
            f"{hidden_size}: it does not fit this model."
        )
    if layout.vocab_size is not None and layout.vocab_size != vocab_size:
        raise ValueError(
            f"Medusa adapter {path}{fit} predicts over {layout.vocab_size} tokens but the model's "
            f"vocabulary has {vocab_size}: it does not fit this model."
        )
    if model_id and base and not same_model_name(base, model_id):
        logger.warning(
            "Medusa adapter %s was trained on %s, not %s: shapes fit, but its speculation may be poor",
            path,
            base,
            model_id,
        )
    if version == 2 and layout.own_lm_heads:
        logger.warning("Medusa adapter %s declares version 2 but holds per-head LM heads: used as v1", path)
    config = MedusaConfig(
        num_heads=layout.num_heads,
        num_layers=layout.num_layers,
        version=version,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        base_model_name_or_path=base,
        own_lm_heads=layout.own_lm_heads,
    )
    with torch.device("meta"):  # no random init of weights about to be overwritten
        heads = MedusaHeads(config)
    heads = heads.to(dtype=dtype).to_empty(device=device)
    heads.load_medusa_format(tensors)
    logger.info("Loaded %s from %s", config.describe(), path)
    return heads.eval()


def save_medusa_adapter(heads: MedusaHeads, out_dir: Path, base_model_name_or_path: str) -> None:
    """Write `config.json` and `medusa_lm_head.safetensors` in the Medusa repository's format."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in heads.state_dict_medusa_format().items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "medusa_num_heads": heads.config.num_heads,
        "medusa_num_layers": heads.config.num_layers,
        "base_model_name_or_path": base_model_name_or_path,
        "version": heads.config.version,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    logger.info("Saved %s to %s", heads.config.describe(), out_dir)


def export_vllm(adapter_dir: Path, out_dir: Path, lm_head_weight: torch.Tensor | None) -> None:
    """Write the adapter in vLLM's Medusa format (config.json + model.safetensors) under `out_dir`.

    v2 heads go through the base lm_head, so vLLM needs it: `original_lm_head: true` and one
    `lm_heads.0.weight` holding `lm_head_weight` [V, H]. v1 heads carry their own and ignore it.
    """
    from safetensors.torch import save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    raw = read_medusa_config(adapter_dir)
    specs = {n: s for n, s in read_specs(medusa_weight_files(adapter_dir)).items() if MEDUSA_KEY.match(n)}
    layout, _ = detect_layout({n: s.shape for n, s in specs.items()}, raw, adapter_dir)
    dtype = getattr(torch, _TORCH_DTYPES.get(specs["0.0.linear.weight"].dtype, "float32"))
    if layout.own_lm_heads:
        vocab = layout.vocab_size
    else:
        if lm_head_weight is None:
            raise ValueError("Exporting v2 Medusa heads to vLLM needs the base model's lm_head weight.")
        if lm_head_weight.shape[-1] != layout.hidden_size:
            raise ValueError(
                f"lm_head_weight has shape {list(lm_head_weight.shape)} but the heads' hidden size is "
                f"{layout.hidden_size}."
            )
        vocab = lm_head_weight.shape[0]
    heads = load_medusa_adapter(
        adapter_dir, hidden_size=layout.hidden_size, vocab_size=vocab, dtype=dtype, device="cpu"
    )
    tensors: dict[str, torch.Tensor] = {}
    for name, t in heads.state_dict_medusa_format().items():
        k, j, kind = MEDUSA_KEY.match(name).groups()
        if kind == "weight":  # a v1 head's own LM head
            tensors[f"lm_heads.{k}.weight"] = t.contiguous()
        else:
            tensors[f"blocks.{k}.layers.{j}.{kind.removeprefix('linear.')}"] = t.contiguous()
    if not layout.own_lm_heads:
        tensors["lm_heads.0.weight"] = lm_head_weight.detach().to("cpu", dtype).contiguous()
    config = {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "num_heads": layout.num_heads,
        "num_hidden_layers": layout.num_layers,
        "hidden_size": layout.hidden_size,
        "vocab_size": vocab,
        "medusa_fc_bias": True,
        "original_lm_head": not layout.own_lm_heads,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / VLLM_WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    logger.info("Exported %s to vLLM's format in %s", heads.config.describe(), out_dir)


def inspect_adapter(
    path: str | Path,
    *,
    hidden_size: int | None = None,
    vocab_size: int | None = None,
    model_id: str | None = None,
) -> dict[str, Any]:
    """What an adapter directory holds (Medusa, LoRA or both), and, given a model's sizes, how it can be used."""
    from gorgon.adapters.info import inspect_directory

    return inspect_directory(Path(path), hidden_size=hidden_size, vocab_size=vocab_size, model_id=model_id)


def same_model_name(a: str, b: str) -> bool:
    """Loose: `org/name`, a local `.../name` directory and a different case all name the same model."""
    return Path(a.rstrip("/")).name.lower() == Path(b.rstrip("/")).name.lower()


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_SAFETENSORS_NAMES = {getattr(torch, v): k for k, v in _TORCH_DTYPES.items()}


def _read_json(file: Path, missing_ok: bool = False) -> dict[str, Any]:
    if not file.is_file():
        if missing_ok:
            return {}
        raise ValueError(f"{file} does not exist.")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}).") from e
    return data if isinstance(data, dict) else {}
