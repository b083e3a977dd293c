"""Our Llama-family model against HF transformers on the same random weights: logits allclose in float32."""

import pytest
import torch
from helpers import FAMILIES, gorgon_from_hf, tiny_hf_model

from gorgon.engine.kv_cache import KVCache, SlotAllocator
from gorgon.engine.request import GenerationRequest, SamplingParams, StoppingParams
from gorgon.engine.runner import ModelRunner
from gorgon.engine.scheduler import ScheduledChunk, StepPlan
from gorgon.engine.sequence import Sequence


def _runner(model, slots=2048):
    cache = KVCache(model.config, slots, torch.float32, torch.device("cpu"))
    return ModelRunner(model, cache, torch.float32, torch.device("cpu")), SlotAllocator(slots)


def _seq(prompt, alloc, max_new=32):
    req = GenerationRequest(prompt, SamplingParams(), StoppingParams(max_new_tokens=max_new))
    seq = Sequence(request=req, seed=0)
    seq.slots = alloc.allocate(seq.max_tokens)
    return seq


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_logits_match_hf(family):
    hf = tiny_hf_model(family)
    model = gorgon_from_hf(hf)
    runner, alloc = _runner(model)
    torch.manual_seed(1)
    prompts = [torch.randint(3, 320, (n,)).tolist() for n in (37, 5, 300)]
    seqs = [_seq(p, alloc) for p in prompts]
    # Two chunks for the long prompt, to exercise chunked prefill across KV blocks.
    plan1 = StepPlan(
        [
            ScheduledChunk(seqs[0], 0, prompts[0], True, True),
            ScheduledChunk(seqs[1], 0, prompts[1], True, True),
            ScheduledChunk(seqs[2], 0, prompts[2][:270], True, False),
        ]
    )
    plan2 = StepPlan([ScheduledChunk(seqs[2], 270, prompts[2][270:], True, True)])
    out1 = runner.run(plan1).logits
    out2 = runner.run(plan2).logits
    ours = [out1[0], out1[1], torch.cat([out1[2], out2[0]])]
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_greedy_decode_matches_hf_generate(family):
    hf = tiny_hf_model(family)
    model = gorgon_from_hf(hf)
    runner, alloc = _runner(model)
    prompt = torch.randint(3, 320, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    seq = _seq(prompt, alloc, max_new=40)
    logits = runner.run(StepPlan([ScheduledChunk(seq, 0, prompt, False, True)])).logits[0]
    tokens = []
    for _ in range(40):
        tok = int(logits[-1].argmax())
        tokens.append(tok)
        seq.token_ids.append(tok)
        pos = len(seq.token_ids) - 1
        logits = runner.run(StepPlan([ScheduledChunk(seq, pos, [tok], False, True)])).logits[0]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 20:].tolist()
    assert tokens == ref
