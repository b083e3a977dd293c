"""The embedded default model (SmolLM2-135M-Instruct): parity with HF transformers and batch invariance at
the real shapes (hidden 576, 9 heads over 3 KV heads, vocab 49152), in float32 and bfloat16."""

import pytest
import torch

from gorgon.config import EngineConfig
from gorgon.engine.llm_engine import LLMEngine
from gorgon.engine.request import FinalOutput, GenerationRequest, SamplingParams, StoppingParams
from gorgon.models.factory import build_model

pytestmark = pytest.mark.slow

QUESTIONS = ["What is deep learning?", "Write a haiku about rain.", "List three uses of copper."]


@pytest.fixture(scope="module")
def checkpoint():
    from gorgon.models.loader import resolve_checkpoint

    return resolve_checkpoint(None)


def chat(tok, text):
    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_logits_match_hf_float32(checkpoint):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).eval()
    model = build_model(checkpoint, torch.float32, torch.device("cpu"))
    engine = LLMEngine(model, checkpoint.tokenizer, EngineConfig(), torch.float32, torch.device("cpu"), {2})
    ids = chat(checkpoint.tokenizer, QUESTIONS[0])
    outs: list = []
    engine.add_request(
        GenerationRequest(ids, SamplingParams(), StoppingParams(max_new_tokens=1), prefill_logprobs=True),
        outs.append,
    )
    while engine.has_work():
        engine.step()
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    ref = [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    got = [t.logprob for t in outs[-1].prefill[1:]]
    assert got == pytest.approx(ref, abs=2e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_batch_invariance_at_real_shapes(checkpoint, dtype):
    model = build_model(checkpoint, dtype, torch.device("cpu"))
    tok = checkpoint.tokenizer

    def generate(prompts, budget):
        config = EngineConfig(max_batch_prefill_tokens=budget)
        engine = LLMEngine(model, tok, config, dtype, torch.device("cpu"), {2})
        results: dict[int, list[int]] = {}
        for i, q in enumerate(prompts):
            req = GenerationRequest(
                chat(tok, q), SamplingParams(), StoppingParams(max_new_tokens=24, ignore_eos_token=True)
            )
            engine.add_request(
                req,
                lambda o, i=i: (
                    isinstance(o, FinalOutput) and results.__setitem__(i, [t.id for t in o.tokens])
                ),
            )
        while engine.has_work():
            engine.step()
        return results

    together = generate(QUESTIONS, budget=512)
    for i, q in enumerate(QUESTIONS):
        assert generate([q], budget=7)[0] == together[i]


def test_lora_greedy_matches_peft_float32(checkpoint, tmp_path):
    """A LoRA (rank 8, every projection and the tied lm_head) on the real model: the same greedy tokens as
    HF transformers + PEFT, and close prefill log-probabilities."""
    from helpers import save_peft_adapter
    from transformers import AutoModelForCausalLM

    from gorgon.adapters.lora import load_lora_adapter

    hf = AutoModelForCausalLM.from_pretrained(checkpoint.path, dtype=torch.float32).eval()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    ref = save_peft_adapter(
        hf, tmp_path / "lora", seed=5, std=0.02, r=8, lora_alpha=16, target_modules=targets
    )
    model = build_model(checkpoint, torch.float32, torch.device("cpu"))
    lora = load_lora_adapter(tmp_path / "lora", model.config, dtype=torch.float32, device=torch.device("cpu"))
    engine = LLMEngine(model, checkpoint.tokenizer, EngineConfig(), torch.float32, torch.device("cpu"), {2})
    ids = chat(checkpoint.tokenizer, QUESTIONS[1])
    outs: list = []
    request = GenerationRequest(
        ids, SamplingParams(), StoppingParams(max_new_tokens=24, ignore_eos_token=True), prefill_logprobs=True
    )
    engine.add_request(request, outs.append, lora=lora)
    while engine.has_work():
        engine.step()
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24, do_sample=False)
        logprobs = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
        base = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    final = outs[-1]
    assert [t.id for t in final.tokens] == want[0, len(ids) :].tolist()
    got = [t.logprob for t in final.prefill[1:]]
    assert got == pytest.approx([logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)], abs=2e-4)
    # The adapter matters: its log-probabilities are not the base model's.
    assert max(abs(g - base[i, ids[i + 1]].item()) for i, g in enumerate(got)) > 1e-2


@pytest.mark.parametrize("name", ["smollm2-135m-general", "smollm2-135m-code"])
def test_shipped_medusa_adapters_are_exact_in_bfloat16(checkpoint, name):
    """The shipped adapters on the real model, bf16: drafts are accepted often, and greedy outputs with
    speculation are bitwise those without, alone and in a batch."""
    from gorgon.adapters.shipped import shipped_adapter_dir
    from gorgon.config import SpeculationConfig
    from gorgon.engine.speculation import build_speculator

    dtype, dev = torch.bfloat16, torch.device("cpu")
    model = build_model(checkpoint, dtype, dev)
    spec = SpeculationConfig(adapter_id=str(shipped_adapter_dir(name)), adapter_source="local")
    speculator = build_speculator(spec, model, checkpoint.model_id, dtype, dev)
    assert speculator.heads.draft_vocab.joint_pass  # the default heads draft in the lm_head's pass
    config = EngineConfig(measure_speculation_cost=False)
    prompts = [chat(checkpoint.tokenizer, q) for q in QUESTIONS]

    def generate(speculator, together: bool):
        engine = LLMEngine(model, checkpoint.tokenizer, config, dtype, dev, {2}, speculator)
        results = {}
        for batch in [prompts] if together else [[p] for p in prompts]:
            for p in batch:
                req = GenerationRequest(p, SamplingParams(), StoppingParams(max_new_tokens=64))
                engine.add_request(req, lambda out, k=tuple(p): results.__setitem__(k, out))
            while engine.has_work():
                engine.step()
        return {k: [t.id for t in v.tokens] for k, v in results.items() if isinstance(v, FinalOutput)}

    plain = generate(None, together=False)
    assert generate(speculator, together=False) == plain
    assert generate(speculator, together=True) == plain
    assert speculator.stats.mean_tokens_per_step > 1.1, speculator.stats
