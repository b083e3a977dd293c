"""Medusa adapters shipped with Gorgon for the embedded default model (SmolLM2-135M-Instruct).

Each folder is a complete adapter (config.json, medusa_lm_head.safetensors, gorgon_tree.json, README.md
with the command that reproduced it). `general` is served by default with the embedded model.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).parent
DEFAULT_ADAPTER = "smollm2-135m-general"


def default_adapter_dir() -> Path | None:
    path = SHIPPED / DEFAULT_ADAPTER
    return path if (path / "config.json").is_file() else None


def shipped_adapter_dir(name: str) -> Path:
    path = SHIPPED / name
    if not (path / "config.json").is_file():
        names = (
            ", ".join(sorted(p.name for p in SHIPPED.iterdir() if (p / "config.json").is_file())) or "none"
        )
        raise ValueError(f"No shipped adapter {name!r} (shipped: {names})")
    return path
