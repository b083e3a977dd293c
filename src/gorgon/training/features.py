"""The frozen base model's final hidden states, computed once, by Gorgon's own model in the serving dtype.

Heads read the hidden state that feeds `lm_head` (after the final norm). Serving computes it with this model,
these kernels and this dtype, so training on the same numbers trains the heads on exactly what they will
see. The base is frozen, so the states are computed once and reused by every epoch; with a cache directory
they are also reused by later runs on the same model and data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from gorgon.engine.kv_cache import KVCache, kv_cache_dtype
from gorgon.kernels.linear import row_multiple
from gorgon.models.attention import SCRATCH_SLOT, AttentionMetadata
from gorgon.models.attention import kernel_available as attention_kernel_available
from gorgon.models.factory import build_model, resolve_dtype
from gorgon.models.llama import LlamaModel
from gorgon.models.loader import LoadedCheckpoint, load_state_dict, resolve_checkpoint

log = logging.getLogger(__name__)

FEATURES_FORMAT = "gorgon-hidden-v1"


def load_base_model(
    ckpt: LoadedCheckpoint, dtype: str | torch.dtype, device: torch.device
) -> tuple[LlamaModel, torch.dtype]:
    """The base model in `dtype` ("auto": the serving dtype for `device`), frozen, and that dtype."""
    dt = resolve_dtype(dtype, device) if isinstance(dtype, str) else dtype
    model = build_model(ckpt, dt, device)
    model.requires_grad_(False)
    return model, dt


@torch.no_grad()  # not inference_mode: the states are later saved for backward by the heads' autograd
def hidden_states(
    model: LlamaModel, sequences: Sequence[Sequence[int]], max_rows: int = 2048
) -> list[torch.Tensor]:
    """Final hidden states [T_i, H] of each token sequence (prefilled from scratch), on CPU, in the model's
    dtype. Sequences are packed into forward passes of up to `max_rows` rows (a longer one runs alone), laid
    out as the engine lays out a prefill step: row counts padded for batch invariance, padding rows writing
    the scratch slot."""
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    cfg = model.config
    longest = max((len(s) for s in sequences), default=0)
    cache = KVCache(cfg, max(max_rows, longest), kv_cache_dtype(dtype, device), device)
    multiple = row_multiple(dtype, device)
    use_kernel = attention_kernel_available(cache.layers[0][0].dtype, device)

    out: list[torch.Tensor | None] = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # long first: tighter packs
    start, done, t0 = 0, 0, time.perf_counter()
    bar = tqdm(total=sum(len(s) for s in sequences), desc="hidden states", unit="tok", leave=False)
    while start < len(order):
        batch, rows = [], 0
        while start < len(order) and (not batch or rows + len(sequences[order[start]]) <= max_rows):
            batch.append(order[start])
            rows += len(sequences[order[start]])
            start += 1
        ids, positions, seq_rows, seq_pos, seq_slots = [], [], [], [], []
        for i in batch:
            n = len(sequences[i])
            first = len(ids)
            ids += sequences[i]
            positions += range(n)
            seq_rows.append(list(range(first, first + n)))
            seq_pos.append(list(range(n)))
            seq_slots.append([SCRATCH_SLOT + 1 + first + p for p in range(n)])  # slot 0 is scratch
        pad = -len(ids) % multiple
        write = [s for slots in seq_slots for s in slots] + [SCRATCH_SLOT] * pad
        meta = AttentionMetadata.build(
            seq_rows,
            seq_pos,
            seq_slots,
            write,
            heads_per_kv=cfg.num_heads // cfg.num_kv_heads,
            sliding_window=cfg.sliding_window,
            use_kernel=use_kernel,
            device=device,
        )
        input_ids = torch.tensor(ids + [0] * pad, dtype=torch.long, device=device)
        pos = torch.tensor(positions + [0] * pad, dtype=torch.long, device=device)
        hidden = model(input_ids, pos, cache.layers, meta)  # (T, H)
        for i, rows_i in zip(batch, seq_rows):
            out[i] = hidden[rows_i[0] : rows_i[-1] + 1].cpu().clone()
        done += rows
        bar.update(rows)
    bar.close()
    seconds = time.perf_counter() - t0
    if done:
        log.info(
            "Hidden states of %d tokens in %.1f s (%.0f tokens/s, %s)",
            done,
            seconds,
            done / max(seconds, 1e-9),
            str(dtype).removeprefix("torch."),
        )
    return out  # type: ignore[return-value]


def cached_hidden_states(
    model: LlamaModel,
    sequences: Sequence[Sequence[int]],
    cache_dir: str | Path | None,
    model_key: str,
    max_rows: int = 2048,
) -> list[torch.Tensor]:
    """`hidden_states`, read from / written to `cache_dir` (when given) under a key of the model, its dtype,
    its KV cache's dtype and the exact token ids, so a changed model, dtype or dataset never reads stale
    states."""
    if cache_dir is None:
        return hidden_states(model, sequences, max_rows)
    from safetensors.torch import load_file, save_file

    dtype = model.embed_tokens.weight.dtype
    kv_dtype = kv_cache_dtype(dtype, model.embed_tokens.weight.device)  # the states depend on it too
    digest = hashlib.sha256(json.dumps([FEATURES_FORMAT, model_key, str(dtype), str(kv_dtype)]).encode())
    for seq in sequences:
        digest.update(torch.tensor(list(seq), dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    file = Path(cache_dir) / f"hidden-{digest.hexdigest()[:24]}.safetensors"
    if file.is_file():
        flat = load_file(str(file))["hidden"]
        log.info("Hidden states read from %s", file)
        return list(flat.split([len(s) for s in sequences]))
    states = hidden_states(model, sequences, max_rows)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    save_file({"hidden": torch.cat(states) if states else torch.empty(0)}, str(tmp))
    tmp.replace(file)  # whole or absent, even if this process is killed while writing
    log.info("Hidden states cached in %s", file)
    return states


def base_lm_head_weight(model_id: str | None, revision: str | None = None) -> torch.Tensor:
    """The base model's lm_head weight [V, H] (float32, CPU), the tied embeddings where it has none."""
    ckpt = resolve_checkpoint(model_id, revision)
    state = load_state_dict(ckpt.path, torch.float32, "cpu")
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        if name in state and (name == "lm_head.weight" or ckpt.config.tie_word_embeddings):
            return state[name]
    raise ValueError(f"Model {ckpt.model_id!r} has no lm_head.weight (and does not tie its embeddings).")
