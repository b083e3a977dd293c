"""What a request's `adapter_id` names, loaded and checked against the served model and the rules of use.

A directory can hold a LoRA (PEFT `adapter_config.json`), Medusa heads (`config.json` with
`medusa_num_heads`), or both (a LoRA trained jointly with its own heads). LoRAX's rules for per-request Medusa
heads apply to both kinds of heads: a default Medusa adapter exists, the heads are v2, with its head count.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestAdapter:
    adapter_id: str
    lora: Any = None  # gorgon.adapters.lora.LoraAdapter
    medusa: Any = None  # gorgon.adapters.medusa.MedusaHeads
    nbytes: int = 0


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def request_adapter_loader(
    default_heads_config, model, model_id: str, dtype, device, max_bytes: int, roots: tuple[str, ...] = ()
) -> Callable[[str, str, str | None], RequestAdapter]:
    """`load(adapter_id, source, api_token)` for the adapter registry (runs in a worker thread). Raises
    ValueError with a sentence for the user when the adapter cannot be used. `roots`: where local adapters
    may lie (empty: anywhere)."""
    from pathlib import Path

    from gorgon.adapters.lora import is_lora_dir, load_lora_adapter, lora_nbytes_on_disk
    from gorgon.adapters.medusa import check_per_request
    from gorgon.adapters.medusa_io import is_medusa_dir
    from gorgon.adapters.source import resolve_adapter_dir
    from gorgon.engine.speculation import load_heads

    def load(adapter_id: str, source: str, api_token: str | None) -> RequestAdapter:
        allowed = tuple(Path(r) for r in roots) if roots else None
        path = resolve_adapter_dir(adapter_id, source, api_token=api_token, allowed_roots=allowed)
        has_lora, has_heads = is_lora_dir(path), is_medusa_dir(path)
        if not (has_lora or has_heads):
            raise ValueError(
                f"{adapter_id!r} is neither a LoRA adapter (adapter_config.json) nor a Medusa adapter "
                "(config.json with medusa_num_heads)."
            )
        lora = medusa = None
        if has_lora:
            _check_budget(adapter_id, lora_nbytes_on_disk(path), max_bytes)  # before reading it
            lora = load_lora_adapter(
                path, model.config, dtype=dtype, device=device, adapter_id=adapter_id, model_id=model_id
            )
        if has_heads:
            _, heads = load_heads(adapter_id, source, api_token, model, model_id, dtype, device, path=path)
            if has_lora and default_heads_config is None:
                log.info("adapter %s: its own Medusa heads unused (no default Medusa adapter)", adapter_id)
            else:
                check_per_request(heads.config, default_heads_config)
                medusa = heads
        nbytes = (lora.nbytes if lora is not None else 0) + _heads_bytes(medusa)
        _check_budget(adapter_id, nbytes, max_bytes)
        return RequestAdapter(adapter_id, lora, medusa, nbytes)

    return load


def _heads_bytes(heads) -> int:
    if heads is None:
        return 0
    return sum(t.numel() * t.element_size() for t in heads.state_dict().values())


def _check_budget(adapter_id: str, nbytes: int, max_bytes: int) -> None:
    if nbytes > max_bytes:
        raise ValueError(
            f"adapter {adapter_id!r} is too large: {nbytes / 2**20:.1f} MiB, over the "
            f"{max_bytes / 2**20:.1f} MiB adapter memory budget (--adapter-memory-fraction)."
        )
