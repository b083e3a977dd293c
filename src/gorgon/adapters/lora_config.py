"""What a PEFT LoRA's `adapter_config.json` says that matters to Gorgon, and what it refuses.

PEFT adds `scale * B(A(x))` to a Linear's output, with scale = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)),
r and alpha per module (`rank_pattern`, `alpha_pattern`: the first pattern matching a module's name wins).
Switches that change the forward pass in ways Gorgon does not implement (DoRA, trained biases, full module
copies, ...) are refused, each with one ValueError sentence naming the adapter and the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gorgon.adapters.medusa_io import LORA_CONFIG_FILE, _read_json

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")

# Config switches that change what the adapter computes; PEFT's default (off) is the only supported value.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora: true) rescales the weights by a learned magnitude, which Gorgon does not "
    "apply (merge it into the base model instead)",
    "fan_in_fan_out": "fan_in_fan_out: true is for Conv1D layers (GPT-2); Llama-family Linear layers never "
    "use it",
    "lora_bias": "lora_bias: true trains a bias on lora_B, which Gorgon does not apply",
    "use_qalora": "QALoRA (use_qalora: true) pools the inputs of lora_A, which Gorgon does not do",
}
_UNSUPPORTED_LISTS = {
    "modules_to_save": "it saves full copies of {value} (modules_to_save), which Gorgon does not support: "
    "only LoRA weights can be served",
    "layer_replication": "it replicates layers (layer_replication: {value}), which Gorgon does not support",
    "target_parameters": "it targets parameters directly (target_parameters: {value}), which Gorgon does not "
    "support",
    "trainable_token_indices": "it trains embedding rows (trainable_token_indices), which Gorgon does not "
    "support",
    "alora_invocation_tokens": "it is an activated LoRA (alora_invocation_tokens), which Gorgon does not "
    "support",
}


@dataclass(frozen=True)
class LoraConfig:
    """What `adapter_config.json` says that matters to Gorgon (PEFT's defaults where a key is absent)."""

    rank: int  # `r`: the default rank (each module's actual rank is its tensors')
    alpha: float  # `lora_alpha`
    use_rslora: bool
    # The targets `target_modules` names; empty when it is a regex or absent (the tensors decide anyway).
    targets: tuple[str, ...]
    base_model_name_or_path: str | None
    # (regex, value) in the file's order: PEFT takes the first pattern that matches a module's name. (It
    # writes the file with sorted keys, so overlapping patterns may have matched in another order in training;
    # the ranks come from the tensors anyway, and a rank the config contradicts is logged.)
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_file(cls, path: str | Path, *, name: str | None = None) -> LoraConfig:
        """Parse `path` (an adapter directory or its adapter_config.json); `name`: the adapter, for errors."""
        path = Path(path)
        file = path / LORA_CONFIG_FILE if path.is_dir() else path
        name = name or str(file.parent)
        if not file.is_file():
            raise ValueError(f"LoRA adapter {name} has no {LORA_CONFIG_FILE}.")
        raw = _read_json(file)
        _check_supported(raw, name)
        return cls(
            rank=_positive_int(raw.get("r", 8), "r", name),
            alpha=_number(raw.get("lora_alpha", 8), "lora_alpha", name),
            use_rslora=bool(raw.get("use_rslora", False)),
            targets=_config_targets(raw.get("target_modules"), name),
            base_model_name_or_path=raw.get("base_model_name_or_path") or None,
            rank_pattern=_pattern(raw.get("rank_pattern"), "rank_pattern", name, _positive_int),
            alpha_pattern=_pattern(raw.get("alpha_pattern"), "alpha_pattern", name, _number),
        )

    def alpha_for(self, module: str) -> float:
        """The alpha of the module named `module` in the wrapped model (`model.layers.0.self_attn.q_proj`)."""
        return _first_match(self.alpha_pattern, module, self.alpha)

    def rank_for(self, module: str) -> int:
        return _first_match(self.rank_pattern, module, self.rank)

    def scale(self, module: str, rank: int) -> float:
        """PEFT's `scaling` for a module of rank `rank`: alpha / r, rsLoRA alpha / sqrt(r)."""
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _check_supported(raw: dict[str, Any], name: str) -> None:
    peft_type = raw.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "LORA":
        raise ValueError(
            f"Adapter {name} is a PEFT {peft_type} adapter (peft_type in {LORA_CONFIG_FILE}); Gorgon serves "
            "LoRA adapters only."
        )
    for key, why in _UNSUPPORTED_FLAGS.items():
        if raw.get(key):
            raise ValueError(f"LoRA adapter {name} cannot be served: {why}.")
    bias = raw.get("bias", "none")
    if bias not in (None, "none"):
        raise ValueError(
            f"LoRA adapter {name} cannot be served: it trains biases (bias: {bias!r} in {LORA_CONFIG_FILE}), "
            "which Gorgon does not apply; retrain with bias='none'."
        )
    for key, why in _UNSUPPORTED_LISTS.items():
        if value := raw.get(key):
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            raise ValueError(f"LoRA adapter {name} cannot be served: {why.format(value=shown)}.")


def _config_targets(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        # "all-linear" means every Linear but the output layer (PEFT); any other string is a regex, and
        # which modules it matched is in the tensors.
        return TARGETS[:-1] if value == "all-linear" else ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(
            f"LoRA adapter {name}: target_modules in {LORA_CONFIG_FILE} must be a list of module names or a "
            f"regex, not {value!r}."
        )
    # PEFT matches a list entry against the end of a module's name: `q_proj` or `...self_attn.q_proj`.
    targets = {v.rsplit(".", 1)[-1] for v in value}
    if unsupported := sorted(targets - set(TARGETS)):
        raise ValueError(
            f"LoRA adapter {name} targets {', '.join(unsupported)} (target_modules in {LORA_CONFIG_FILE}); "
            f"Gorgon applies LoRA to {', '.join(TARGETS)} only."
        )
    return tuple(t for t in TARGETS if t in targets)


def _pattern(value: Any, field: str, name: str, parse) -> tuple[tuple[str, Any], ...]:
    if not value:
        return ()
    if not isinstance(value, dict):  # a ValueError like every other problem in the file: callers catch it
        raise ValueError(  # noqa: TRY004
            f"LoRA adapter {name}: {field} in {LORA_CONFIG_FILE} must map module names to values."
        )
    for key in value:
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as e:
            raise ValueError(
                f"LoRA adapter {name}: {field} key {key!r} in {LORA_CONFIG_FILE} is not a valid regex ({e})."
            ) from None
    return tuple((str(k), parse(v, f"{field}[{k!r}]", name)) for k, v in value.items())


def _first_match(pattern: tuple[tuple[str, Any], ...], module: str, default):
    # PEFT's get_pattern_key: the first key that matches the end of the name, at a dot boundary.
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _positive_int(value: Any, field: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"LoRA adapter {name}: {field} in {LORA_CONFIG_FILE} must be a positive integer, not {value!r}."
        )
    return value


def _number(value: Any, field: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(
            f"LoRA adapter {name}: {field} in {LORA_CONFIG_FILE} must be a number, not {value!r}."
        )
    return float(value)


# --- weights ---------------------------------------------------------------------------------------------
