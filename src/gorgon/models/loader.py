"""Find a checkpoint (embedded default, local directory, `.gguf` file or hub id) and read its tensors.

`resolve_checkpoint` turns what the user asked for into a local directory holding `config.json`, HF-named
weights and tokenizer files, and reads the config and tokenizer; `load_state_dict` reads the weights.
Every failure a user can cause surfaces as one `ModelLoadError` sentence.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gorgon.config import ModelConfig
from gorgon.errors import ModelLoadError
from gorgon.models import embedded

logger = logging.getLogger(__name__)

# Files fetched from the hub: everything the engine reads, nothing it does not (no .bin, .pt, onnx, gguf).
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
]
# Mistral repos ship the same weights twice; the `consolidated` copy has non-HF tensor names.
HUB_IGNORE = ["consolidated*"]
# Only for repos without safetensors.
HUB_BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


@dataclass
class LoadedCheckpoint:
    model_id: str  # what the user asked for, or the embedded default's hub id
    path: Path  # local directory with config.json, weights and tokenizer files
    hf_config: dict[str, Any]  # parsed config.json
    config: ModelConfig  # eos_token_ids include generation_config.json's
    tokenizer: Any  # a transformers tokenizer loaded from `path`


def resolve_checkpoint(model_id: str | None, revision: str | None = None) -> LoadedCheckpoint:
    """Locate `model_id` (None: the embedded default), convert or download it if needed, read its config."""
    if model_id is None:
        return _read_checkpoint(embedded.EMBEDDED_MODEL_ID, embedded.embedded_checkpoint_dir())
    local = Path(model_id).expanduser()
    if local.is_dir():
        return _read_checkpoint(model_id, local)
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"Model {model_id!r} is a file but not a .gguf file: pass a directory with config.json and "
                "*.safetensors, a .gguf file or a hub id."
            )
        return _read_checkpoint(model_id, embedded.gguf_checkpoint_dir(local))
    return _read_checkpoint(model_id, _download(model_id, revision))


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint directory: safetensors if any, else PyTorch `.bin` files."""
    for index_name, patterns in (
        ("model.safetensors.index.json", ("model*.safetensors", "*.safetensors")),
        ("pytorch_model.bin.index.json", ("pytorch_model*.bin",)),
    ):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
        for pattern in patterns:
            files = sorted(p for p in path.glob(pattern) if not p.name.startswith("consolidated"))
            if files:
                return files
    return []


def load_state_dict(path: Path, dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in `path` under their HF names, floats cast to `dtype`, on `device`.

    Reads sharded safetensors through their index, else `.bin` files with `torch.load(weights_only=True)`,
    which refuses pickled code. A tied `lm_head.weight` may be absent: the model ties it to the embeddings.
    """
    from safetensors import safe_open

    files = weight_files(path)
    if not files:
        raise ModelLoadError(f"No weights in {path}: expected *.safetensors or pytorch_model*.bin files.")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"Checkpoint {path} is incomplete: missing {', '.join(missing)}.")

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                for name in fh.keys():  # noqa: SIM118 -- safe_open handles are not iterable
                    state[name] = convert(fh.get_tensor(name))
        else:
            try:
                shard = torch.load(f, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise ModelLoadError(
                    f"Refusing to load {f}: it pickles objects other than tensors (convert it to safetensors)."
                ) from e
            state.update({name: convert(t) for name, t in shard.items()})
            del shard
    logger.info("Loaded %d tensors from %d file(s) in %s", len(state), len(files), path)
    return state


def _read_checkpoint(model_id: str, path: Path) -> LoadedCheckpoint:
    from transformers import AutoTokenizer

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"Model {model_id!r} has no config.json in {path}.")
    hf_config = json.loads(config_file.read_text())
    try:
        config = ModelConfig.from_hf(hf_config)
    except (ValueError, KeyError, TypeError) as e:
        reason = f"missing config key {e}" if isinstance(e, KeyError) else str(e)
        raise ModelLoadError(f"Model {model_id!r} is not supported: {reason}.") from e
    config = replace(config, eos_token_ids=_merge_generation_eos(config.eos_token_ids, path))
    if not weight_files(path):
        raise ModelLoadError(
            f"Model {model_id!r} has no weights in {path}: expected *.safetensors or pytorch_model*.bin."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... depending on what is off
        raise ModelLoadError(f"Model {model_id!r}: cannot load its tokenizer from {path} ({e}).") from e
    logger.info(
        "Model %s: %s, %d layers, hidden %d, vocab %d, from %s",
        model_id,
        config.model_type,
        config.num_layers,
        config.hidden_size,
        config.vocab_size,
        path,
    )
    return LoadedCheckpoint(
        model_id=model_id, path=path, hf_config=hf_config, config=config, tokenizer=tokenizer
    )


def _merge_generation_eos(eos: tuple[int, ...], path: Path) -> tuple[int, ...]:
    # Chat models often stop on an end-of-turn token that only generation_config.json names.
    gen_file = path / "generation_config.json"
    if not gen_file.is_file():
        return eos
    extra = json.loads(gen_file.read_text()).get("eos_token_id")
    extra = extra if isinstance(extra, list) else ([] if extra is None else [extra])
    return tuple(dict.fromkeys([*eos, *extra]))


def _download(model_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    not_local = f"Model {model_id!r} not found: not a local directory or .gguf file"
    try:
        path = Path(
            snapshot_download(
                model_id, revision=revision, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORE
            )
        )
        if not weight_files(path):
            path = Path(snapshot_download(model_id, revision=revision, allow_patterns=HUB_BIN_PATTERNS))
        return path
    except HFValidationError as e:
        raise ModelLoadError(f"{not_local}, nor a valid hub id.") from e
    except RepositoryNotFoundError as e:  # also gated repos
        raise ModelLoadError(
            f"{not_local}, and the hub has no such repository (or it is gated or private: set HF_TOKEN)."
        ) from e
    except RevisionNotFoundError as e:
        raise ModelLoadError(f"Model {model_id!r} has no revision {revision!r} on the hub.") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as e:
        if model_id.lower() == embedded.EMBEDDED_MODEL_ID.lower() and revision is None:
            logger.warning(
                "The hub cannot be reached and %s is not in the HF cache: using the embedded copy "
                "(dequantised from Q4_1, so its outputs differ slightly from the hub's weights)",
                model_id,
            )
            return embedded.embedded_checkpoint_dir()
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{not_local}, and the hub could not be reached ({reason}).") from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"Model {model_id!r} could not be downloaded from the hub ({e}).") from e
