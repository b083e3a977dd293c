"""Where an adapter's files are: a local directory, or a hub repository fetched into the HF cache.

LoRAX names adapters by id plus `adapter_source`; Gorgon reads `local` and `hub`. Every failure a user can
cause is one ValueError sentence (callers turn it into a start-up error or a per-request 424).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

ADAPTER_SOURCES = ("local", "hub")
# Everything a Medusa or LoRA adapter needs; pickles only when a repository has no safetensors.
HUB_PATTERNS = ["config.json", "adapter_config.json", "*.safetensors", "gorgon_tree.json"]
HUB_LEGACY_PATTERNS = ["medusa_lm_head.pt", "adapter_model.bin"]


def resolve_adapter_dir(
    adapter_id: str,
    source: str | None = "hub",
    *,
    api_token: str | None = None,
    revision: str | None = None,
    allowed_roots: tuple[Path, ...] | None = None,
) -> Path:
    """The local directory holding adapter `adapter_id` from `source` (downloading it if needed).

    `hub` also accepts an existing local directory, as model ids do. With HF_HUB_OFFLINE set, only the HF
    cache is read. `api_token` reaches private or gated repositories (default: HF_TOKEN / the saved login).
    `allowed_roots` (the operator's `--adapter-root`s, for adapters named by requests): local directories
    must lie inside one of them once symlinks and `..` are resolved; relative ids are looked up in each.
    """
    source = source or "hub"  # LoRAX's default when a request names no source
    if source not in ADAPTER_SOURCES:
        raise ValueError(f"Unknown adapter source {source!r}: use one of {', '.join(ADAPTER_SOURCES)}.")
    if not adapter_id or not adapter_id.strip():
        raise ValueError("Empty adapter id.")
    if "\x00" in adapter_id:
        raise ValueError("Adapter id contains a NUL character.")
    if allowed_roots is not None:
        return _resolve_confined(adapter_id, source, allowed_roots, api_token, revision)
    local = Path(adapter_id).expanduser()
    if source == "local":
        if not local.is_dir():
            what = "a file, not a directory" if local.exists() else "no such directory"
            raise ValueError(f"Adapter {adapter_id!r} (source local): {what}.")
        return local
    if local.is_dir():
        logger.info("Adapter %s is a local directory: using it instead of the hub", adapter_id)
        return local
    return _download(adapter_id, api_token, revision)


def _resolve_confined(
    adapter_id: str, source: str, roots: tuple[Path, ...], api_token: str | None, revision: str | None
) -> Path:
    """A request's adapter when the operator confined local adapters to `roots`."""
    if source == "hub":
        # Only real hub ids: a hub id never reads a local directory here (it could lie outside the roots).
        return _download(adapter_id, api_token, revision)
    path = Path(adapter_id)
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        real = candidate.resolve()  # follows symlinks and `..`
        if any(real.is_relative_to(root.resolve()) for root in roots):
            if real.is_dir():
                return real
        elif path.is_absolute() or candidate.exists():
            break
    else:
        raise ValueError(f"Adapter {adapter_id!r} (source local): no such directory under the adapter roots.")
    raise ValueError(
        f"Adapter {adapter_id!r} (source local) is outside the directories this server allows "
        "(--adapter-root)."
    )


def hub_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _download(adapter_id: str, api_token: str | None, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    kwargs = {"revision": revision, "token": api_token, "local_files_only": offline}
    try:
        path = Path(snapshot_download(adapter_id, allow_patterns=HUB_PATTERNS, **kwargs))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(adapter_id, allow_patterns=HUB_LEGACY_PATTERNS, **kwargs))
    except HFValidationError as e:
        raise ValueError(f"Adapter {adapter_id!r} is not a local directory, nor a valid hub id.") from e
    except RepositoryNotFoundError as e:  # also gated and private repos without a token
        raise ValueError(
            f"Adapter {adapter_id!r} not found on the hub (if it is private or gated, pass an api token or "
            "set HF_TOKEN; for a local directory use adapter source local)."
        ) from e
    except RevisionNotFoundError as e:
        raise ValueError(f"Adapter {adapter_id!r} has no revision {revision!r} on the hub.") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as e:
        if offline:
            raise ValueError(
                f"Adapter {adapter_id!r} is not in the local HF cache and HF_HUB_OFFLINE is set: download it "
                "first or pass a local directory (adapter source local)."
            ) from e
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"Adapter {adapter_id!r}: the hub could not be reached ({reason}).") from e
    except HfHubHTTPError as e:
        raise ValueError(f"Adapter {adapter_id!r} could not be downloaded from the hub ({e}).") from e
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ValueError(
            f"Hub repository {adapter_id!r} is not an adapter: it has neither a config.json (Medusa) nor an "
            "adapter_config.json (LoRA)."
        )
    logger.info("Adapter %s from the hub: %s", adapter_id, path)
    return path
