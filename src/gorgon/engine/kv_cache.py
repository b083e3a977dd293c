"""One preallocated KV store per layer, addressed by slot; positions map to slots through per-sequence tables.

Slot 0 is scratch: padding rows write there and padding columns read it (masked). A rejected draft costs
nothing: its slots are simply overwritten later.
"""

from __future__ import annotations

import torch

from gorgon.config import ModelConfig
from gorgon.models.attention import SCRATCH_SLOT


def kv_cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The serving dtype, as HF transformers keeps it: attention reads every cached key and value once per
    step, so at high concurrency a bfloat16 cache halves what is the largest memory traffic after the weights
    (values are the projection's own bfloat16 outputs; rotated keys are rounded to it once). Attention
    arithmetic stays float32. Float16 on a CPU keeps a float32 cache: the CPU kernels read float32 or
    bfloat16 only."""
    if device.type == "cpu" and dtype not in (torch.float32, torch.bfloat16):
        return torch.float32
    return dtype


class KVCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_slots + 1, cfg.num_kv_heads, cfg.head_dim)  # +1: the scratch slot
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(cfg.num_layers)
        ]
        self.num_slots = num_slots

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


class SlotAllocator:
    """Free list of KV slots. Pure bookkeeping, no tensors, so the scheduler can be tested on its own."""

    def __init__(self, num_slots: int) -> None:
        # Hand out low slots first: they are touched most and stay warm in cache.
        self._free = list(range(num_slots, SCRATCH_SLOT, -1))
        self.capacity = num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache exhausted: need {n} slots, {len(self._free)} free")
        taken = self._free[-n:] if n else []
        del self._free[len(self._free) - n :]
        return taken[::-1]

    def free(self, slots: list[int]) -> None:
        # Kept sorted, so a new sequence gets the lowest free slots in ascending order: contiguous where
        # possible. Speculation leaves a finished sequence's slots shuffled (accepted tree nodes' slots are
        # swapped into its positions); handed out again as freed, they would scatter the next sequences'
        # keys and values and slow every attention read.
        self._free.extend(slots)
        self._free.sort(reverse=True)
