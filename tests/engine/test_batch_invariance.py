"""A sequence's logits are bitwise the same alone or in a busy batch, however its prompt is chunked."""

import pytest
import torch
from helpers import gorgon_from_hf, tiny_hf_model

from gorgon.engine import runner as runner_module
from gorgon.engine.kv_cache import KVCache, SlotAllocator
from gorgon.engine.request import GenerationRequest, SamplingParams, StoppingParams
from gorgon.engine.runner import ModelRunner
from gorgon.engine.scheduler import ScheduledChunk, StepPlan
from gorgon.engine.sequence import Sequence
from gorgon.kernels import linear as linear_kernels

STEPS = 12


def _seq(prompt, alloc, max_new=STEPS + 2):
    req = GenerationRequest(prompt, SamplingParams(), StoppingParams(max_new_tokens=max_new))
    seq = Sequence(request=req, seed=0)
    seq.slots = alloc.allocate(seq.max_tokens)
    return seq


def _prompt(n, seed):
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _generate(runner, alloc, prompt, chunk_size, companions):
    """Greedy-decode `prompt` for STEPS tokens; each step also runs `companions` (prompts prefilled and
    decoded alongside). Returns the list of logits rows of the main sequence."""
    main = _seq(prompt, alloc)
    others = [_seq(p, alloc, max_new=len(prompt) + STEPS) for p in companions]
    rows = []
    done = 0
    while len(rows) < STEPS:
        chunks = []
        if done < len(prompt):
            end = min(len(prompt), done + chunk_size)
            chunks.append(ScheduledChunk(main, done, prompt[done:end], False, end == len(prompt)))
            done = end
        else:
            pos = len(main.token_ids) - 1
            chunks.append(ScheduledChunk(main, pos, [main.token_ids[pos]], False, True))
        for o in others:
            if o.num_cached < o.num_prompt:
                chunks.append(ScheduledChunk(o, 0, o.token_ids, False, True))
                o.num_cached = o.num_prompt
            else:
                pos = len(o.token_ids) - 1
                chunks.append(ScheduledChunk(o, pos, [o.token_ids[pos]], False, True))
        # Put the main sequence in the middle of the batch when it has company.
        chunks = chunks[1:2] + chunks[:1] + chunks[2:] if len(chunks) > 1 else chunks
        out = runner.run(StepPlan(chunks)).logits
        for chunk, logits in zip(chunks, out):
            if chunk.samples:
                chunk.seq.token_ids.append(int(logits[-1].argmax()))
                if chunk.seq is main:
                    rows.append(logits[-1].clone())
    for s in [main, *others]:
        alloc.free(s.slots)
    return rows


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_and_chunking_invariance(dtype, kernel, monkeypatch):
    if not kernel:  # the PyTorch fallbacks must be just as invariant
        monkeypatch.setattr(linear_kernels, "kernel_available", lambda *a: False)
        monkeypatch.setattr(runner_module, "attention_kernel_available", lambda *a: False)
    model = gorgon_from_hf(tiny_hf_model("llama", max_position_embeddings=2048), dtype)
    cache = KVCache(model.config, 4096, dtype, torch.device("cpu"))
    runner = ModelRunner(model, cache, dtype, torch.device("cpu"))
    alloc = SlotAllocator(4096)
    prompt = _prompt(290, 0)
    alone = _generate(runner, alloc, prompt, chunk_size=10_000, companions=[])
    variants = [
        {"chunk_size": 64, "companions": []},
        {"chunk_size": 10_000, "companions": [_prompt(5, 1)]},
        {"chunk_size": 100, "companions": [_prompt(700, 2), _prompt(33, 3), _prompt(1, 4)]},
        {"chunk_size": 7, "companions": [_prompt(3, 5)] * 6},
    ]
    for v in variants:
        got = _generate(runner, alloc, prompt, **v)
        for step, (a, b) in enumerate(zip(alone, got)):
            assert torch.equal(a, b), f"{dtype} {v['chunk_size']=} step {step}: logits differ"
