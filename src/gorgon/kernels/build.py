"""Builds Gorgon's CPU kernels once (torch's C++ extension builder) and caches them per source and torch
version. Where the CPU lacks AVX-512 with BF16, or no compiler works, callers fall back to PyTorch ops."""

from __future__ import annotations

import hashlib
import logging
import os
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES = [
    _HERE / n
    for n in (
        "cpu_linear.cpp",
        "cpu_attention.cpp",
        "cpu_fused.cpp",
        "cpu_lora.cpp",
        "cpu_sampling.cpp",
        "bindings.cpp",
    )
]
HEADERS = [_HERE / "cpu_math.h"]  # part of the build digest, not compiled on their own
# -fopenmp: at::parallel_for is header code that only spreads work over threads when built with OpenMP.
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]
REQUIRED_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@cache
def cpu_extension():
    """The compiled kernel module, or None where the CPU or toolchain cannot have it."""
    if os.environ.get("GORGON_DISABLE_KERNELS") == "1":
        return None
    if not REQUIRED_CPU_FLAGS <= cpu_flags():
        log.info("CPU lacks AVX-512 BF16: using PyTorch ops instead of Gorgon's CPU kernels")
        return None
    from platformdirs import user_cache_dir
    from torch.utils.cpp_extension import load

    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in SOURCES + HEADERS) + torch.__version__.encode()
    ).hexdigest()
    root = Path(os.environ.get("GORGON_CACHE_DIR") or user_cache_dir("gorgon"))
    build_dir = root / "kernels" / f"cpu_{digest[:12]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(build_dir)
    log.info("loading CPU kernels (the first use compiles them, about a minute)")
    try:
        return load(
            name="gorgon_cpu_kernels",
            sources=[str(p) for p in SOURCES],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - no compiler, old toolchain...: stay correct, just slower
        log.warning("could not build CPU kernels (%s): using PyTorch ops", exc)
        return None


STALE_LOCK_SECONDS = 600  # a build takes one to three minutes here


def _clear_stale_lock(build_dir: Path) -> None:
    """torch's extension builder waits forever on a `lock` file left by a process killed while it held it
    (even a process that only checked an existing build): remove one older than any build takes."""
    import time

    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("removing a stale kernel build lock (%.0f s old): %s", age, lock)
        lock.unlink(missing_ok=True)
