"""What an adapter directory holds (Medusa heads, a PEFT LoRA, or both) and whether it fits a model.

Reads only configs and safetensors headers, so inspecting a large adapter is instant. Backs
`gorgon adapter info`; `medusa_io.inspect_adapter` is the public entry point.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from gorgon.adapters.medusa import per_request_problem
from gorgon.adapters.medusa_io import (
    LORA_CONFIG_FILE,
    MEDUSA_KEY,
    _read_json,
    detect_layout,
    is_medusa_dir,
    medusa_weight_files,
    parse_version,
    read_medusa_config,
    read_specs,
    same_model_name,
)

LORA_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Which side of a Llama-family projection has the model's hidden size.
_IN_HIDDEN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"}
_OUT_HIDDEN = {"o_proj", "down_proj"}
# PEFT names: ...layers.0.self_attn.q_proj.lora_A.weight (older files: lora_A.default.weight)
_LORA_KEY = re.compile(r"\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


def inspect_directory(
    path: Path, *, hidden_size: int | None, vocab_size: int | None, model_id: str | None
) -> dict[str, Any]:
    if not path.is_dir():
        raise ValueError(f"Adapter {path} is not a directory.")
    medusa = _medusa_info(path) if is_medusa_dir(path) else None
    lora = _lora_info(path) if (path / LORA_CONFIG_FILE).is_file() else None
    if medusa is None and lora is None:
        raise ValueError(
            f"{path} is not an adapter: expected a config.json with medusa_num_heads (Medusa) or an "
            f"{LORA_CONFIG_FILE} (LoRA)."
        )
    kind = "lora+medusa" if medusa and lora else ("medusa" if medusa else "lora")
    info: dict[str, Any] = {"path": str(path), "type": kind, "medusa": medusa, "lora": lora}
    if hidden_size is not None and vocab_size is not None:
        info["model"] = {"model_id": model_id, "hidden_size": hidden_size, "vocab_size": vocab_size}
        info["usable"] = _usability(medusa, lora, hidden_size, vocab_size, model_id)
    return info


def format_adapter_info(info: dict[str, Any]) -> str:
    """`inspect_adapter`'s result as the lines `gorgon adapter info` prints."""
    lines = [f"Adapter: {info['path']} ({info['type']})"]
    if m := info["medusa"]:
        declared = f"version {m['version']}" if m["version_declared"] else "no version in config.json: 1"
        lm = "its own LM heads" if m["has_own_lm_heads"] else "through the base lm_head"
        lines += [
            f"Medusa {m['layout']} ({declared}): {m['num_heads']} heads x {m['num_layers']} layer(s), {lm}",
            f"  hidden size {m['hidden_size']}"
            + (f", vocabulary {m['vocab_size']}" if m["vocab_size"] else ""),
            f"  base model: {m['base_model_name_or_path'] or 'not named'}",
            f"  {_size(m)}",
        ]
        lines += [f"  note: {n}" for n in m["notes"]]
    if lr := info["lora"]:
        targets = lr["target_modules"]
        targets = "targets " + (", ".join(targets) if isinstance(targets, list) else str(targets))
        lines += [
            f"LoRA ({lr['peft_type'] or 'type not named'}): rank {lr['rank']}, alpha {lr['alpha']}, {targets}",
            f"  base model: {lr['base_model_name_or_path'] or 'not named'}",
            f"  {_size(lr)}",
        ]
        lines += [f"  note: {n}" for n in lr["notes"]]
    if usable := info.get("usable"):
        model = info["model"]
        lines.append(
            f"On {model['model_id'] or 'the model'} (hidden {model['hidden_size']}, vocabulary "
            f"{model['vocab_size']}):"
        )
        for key, label in (
            ("default", "as the default adapter (--adapter-id)"),
            ("per_request", "per request"),
        ):
            verdict = usable[key]
            lines.append(f"  {label}: {'yes' if verdict['ok'] else 'no'}")
            lines += [f"    - {r}" for r in verdict["reasons"]]
        lines += [f"  note: {n}" for n in usable["notes"]]
    else:
        lines.append("Pass --model-id to check whether it fits a model.")
    return "\n".join(lines) + "\n"


def _medusa_info(path: Path) -> dict[str, Any]:
    raw = read_medusa_config(path)
    version = parse_version(raw.get("version"))
    files = medusa_weight_files(path)
    specs = {n: s for n, s in read_specs(files).items() if MEDUSA_KEY.match(n)}
    layout, notes = detect_layout({n: s.shape for n, s in specs.items()}, raw, path, warn=False)
    if version == 2 and layout.own_lm_heads:
        notes.append("declares version 2 but holds per-head LM heads (a v1 layout): it runs as v1")
    if version == 1 and not layout.own_lm_heads:
        notes.append("v2 layout (heads through the base lm_head) without version 2 in config.json")
    return {
        "version": version,
        "version_declared": "version" in raw,
        "layout": "v1" if layout.own_lm_heads else "v2",
        "has_own_lm_heads": layout.own_lm_heads,
        "num_heads": layout.num_heads,
        "num_layers": layout.num_layers,
        "config_num_heads": raw.get("medusa_num_heads"),
        "config_num_layers": raw.get("medusa_num_layers"),
        "hidden_size": layout.hidden_size,
        "vocab_size": layout.vocab_size,
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        **_totals(specs, files),
        "notes": notes,
        "per_request_problem": per_request_problem(version, layout.own_lm_heads),
    }


def _lora_info(path: Path) -> dict[str, Any]:
    cfg = _read_json(path / LORA_CONFIG_FILE)
    files = [path / name for name in LORA_WEIGHT_FILES if (path / name).is_file()][:1]
    specs = {n: s for n, s in read_specs(files).items() if "lora_" in n} if files else {}
    modules: dict[str, dict[str, set[int]]] = {}
    for name, spec in specs.items():
        if m := _LORA_KEY.search(name):
            entry = modules.setdefault(m[1], {"in": set(), "out": set()})
            # lora_A: [r, in_features]; lora_B: [out_features, r]
            entry["in" if m[2] == "A" else "out"].add(spec.shape[-1] if m[2] == "A" else spec.shape[0])
    notes = [] if files else [f"no weights ({' or '.join(LORA_WEIGHT_FILES)})"]
    return {
        "peft_type": cfg.get("peft_type"),
        "rank": cfg.get("r"),
        "alpha": cfg.get("lora_alpha"),
        "target_modules": cfg.get("target_modules"),
        "modules_to_save": cfg.get("modules_to_save"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        **_totals(specs, files),
        "module_shapes": {k: {s: sorted(v) for s, v in io.items()} for k, io in sorted(modules.items())},
        "notes": notes,
    }


def _usability(
    medusa: dict | None, lora: dict | None, hidden: int, vocab: int, model_id: str | None
) -> dict[str, Any]:
    problems: list[str] = []
    notes: list[str] = []
    if medusa:
        if medusa["hidden_size"] != hidden:
            problems.append(f"the Medusa heads have hidden size {medusa['hidden_size']}, the model {hidden}")
        if medusa["vocab_size"] is not None and medusa["vocab_size"] != vocab:
            problems.append(f"the Medusa LM heads predict {medusa['vocab_size']} tokens, the model {vocab}")
    if lora:
        if lora["peft_type"] not in (None, "LORA"):
            problems.append(f"PEFT type {lora['peft_type']} is not LoRA")
        for module, io in lora["module_shapes"].items():
            if module in _IN_HIDDEN and io["in"] and io["in"] != [hidden]:
                problems.append(
                    f"LoRA on {module} takes {io['in']} features, the model's hidden size is {hidden}"
                )
            if module in _OUT_HIDDEN and io["out"] and io["out"] != [hidden]:
                problems.append(
                    f"LoRA on {module} gives {io['out']} features, the model's hidden size is {hidden}"
                )
            if module == "lm_head" and io["out"] and io["out"] != [vocab]:
                problems.append(
                    f"LoRA on lm_head gives {io['out']} logits, the model's vocabulary is {vocab}"
                )
    for part in (medusa, lora):
        base = part and part["base_model_name_or_path"]
        if model_id and base and not same_model_name(base, model_id):
            notes.append(f"trained on {base}, not {model_id}: the shapes decide, but quality may suffer")
    per_request = list(problems)
    if medusa:
        if medusa["per_request_problem"]:
            per_request.append(medusa["per_request_problem"])
        elif not problems:
            notes.append(
                f"per request it needs a default Medusa adapter with {medusa['num_heads']} heads at start-up"
            )
    return {
        "default": {"ok": not problems, "reasons": problems},
        "per_request": {"ok": not per_request, "reasons": per_request},
        "notes": list(dict.fromkeys(notes)),  # a joint adapter names its base model twice
    }


def _totals(specs: dict, files: list[Path]) -> dict[str, Any]:
    return {
        "num_params": sum(math.prod(s.shape) for s in specs.values()),
        "size_bytes": sum(s.nbytes for s in specs.values()),
        "dtypes": sorted({s.dtype for s in specs.values()}),
        "files": [f.name for f in files],
    }


def _size(part: dict[str, Any]) -> str:
    dtypes = "/".join(part["dtypes"]) or "no tensors"
    return f"{part['num_params']:,} parameters, {part['size_bytes']:,} bytes ({dtypes}) in {', '.join(part['files'])}"
