"""LoRA adapters served through the runner and the engine against HF transformers + PEFT on the same weights:
logits to float32 tolerance and greedy tokens, alone and in batches that mix adapters (and no adapter),
with and without Medusa speculation; in bfloat16 a LoRA request's tokens do not depend on its batch."""

from __future__ import annotations

import asyncio

import pytest
import torch
from helpers import (
    final_tokens,
    gorgon_from_hf,
    make_medusa_adapter,
    save_peft_adapter,
    save_tiny_checkpoint,
    tiny_hf_model,
)

from gorgon.adapters.lora import load_lora_adapter
from gorgon.config import EngineConfig, SpeculationConfig
from gorgon.engine.engine import AsyncEngine
from gorgon.engine.kv_cache import KVCache, SlotAllocator
from gorgon.engine.request import GenerationRequest, SamplingParams, StoppingParams
from gorgon.engine.runner import ModelRunner
from gorgon.engine.scheduler import ScheduledChunk, StepPlan
from gorgon.engine.sequence import Sequence

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORAS = {
    "all-r8": {"r": 8, "lora_alpha": 16, "target_modules": ALL},
    "qv-lmhead-rslora-r4": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "lm_head"],
    },
    "mlp-o-patterns": {
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["o_proj", "gate_proj", "down_proj"],
        "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"o_proj": 4},
    },
}
CPU = torch.device("cpu")


def _runner(model, dtype=torch.float32, slots=2048):
    cache = KVCache(model.config, slots, torch.float32, CPU)
    return ModelRunner(model, cache, dtype, CPU), SlotAllocator(slots)


def _seq(prompt, alloc, lora=None):
    req = GenerationRequest(prompt, SamplingParams(), StoppingParams(max_new_tokens=8))
    seq = Sequence(request=req, seed=0, lora=lora)
    seq.slots = alloc.allocate(seq.max_tokens)
    return seq


@pytest.mark.parametrize(
    "family,names",
    [
        ("llama", ["all-r8", "qv-lmhead-rslora-r4"]),
        ("mistral", ["mlp-o-patterns", "all-r8"]),
        ("qwen2", ["qv-lmhead-rslora-r4", "mlp-o-patterns"]),
        ("tied-mha", ["all-r8", "qv-lmhead-rslora-r4"]),
    ],
)
def test_mixed_batch_logits_match_peft(family, names, tmp_path):
    """One prefill step: two LoRA sequences and a base one; each row's logits match its own reference."""
    hf = tiny_hf_model(family)
    refs, loras = [], []
    for i, name in enumerate(names):
        refs.append(save_peft_adapter(hf, tmp_path / name, seed=i, **LORAS[name]))
        loras.append(
            load_lora_adapter(tmp_path / name, gorgon_from_hf(hf).config, dtype=torch.float32, device=CPU)
        )
    model = gorgon_from_hf(hf)
    runner, alloc = _runner(model)
    prompts = [
        torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (23, 9, 17)
    ]
    seqs = [_seq(prompts[0], alloc, loras[0]), _seq(prompts[1], alloc), _seq(prompts[2], alloc, loras[1])]
    plan = StepPlan([ScheduledChunk(s, 0, p, True, True) for s, p in zip(seqs, prompts)])
    got = runner.run(plan).logits
    for logits, prompt, ref in zip(got, prompts, [refs[0], hf, refs[1]]):
        with torch.no_grad():
            want = ref(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(logits, want, atol=2e-4, rtol=1e-4)


# --- end to end through AsyncEngine --------------------------------------------------------------------

CONFIG = EngineConfig(
    max_input_length=64, max_total_tokens=160, max_batch_total_tokens=4000, measure_speculation_cost=False
)
PROMPTS = [[5, 9, 11, 40, 3], [7, 7, 8, 100, 101, 102], [60, 61, 62]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny checkpoint, two LoRA adapters and a Medusa adapter for it, with HF + PEFT references."""
    root = tmp_path_factory.mktemp("lora_served")
    _, hf = save_tiny_checkpoint(root / "model")
    refs = {
        "a": save_peft_adapter(hf, root / "a", seed=1, std=0.2, **LORAS["all-r8"]),
        "b": save_peft_adapter(hf, root / "b", seed=2, std=0.2, **LORAS["qv-lmhead-rslora-r4"]),
    }
    return {
        "root": root,
        "hf": hf,
        "refs": refs,
        "medusa": make_medusa_adapter(root, "medusa", seed=7),
    }


def _engine(served, dtype="float32", speculation=None) -> AsyncEngine:
    eng = AsyncEngine.from_pretrained(
        str(served["root"] / "model"),
        dtype=dtype,
        device="cpu",
        engine_config=CONFIG,
        speculation=speculation,
    )
    eng.start()
    return eng


def _request(prompt, adapter=None, max_new=20):
    return GenerationRequest(
        list(prompt),
        SamplingParams(),
        StoppingParams(max_new_tokens=max_new, ignore_eos_token=True),
        adapter_id=adapter,
        adapter_source="local",
    )


def _hf_greedy(model, prompt, n=20):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("speculate", [False, True], ids=["plain", "medusa"])
def test_mixed_adapters_greedy_equal_peft(served, speculate):
    spec = SpeculationConfig(adapter_id=served["medusa"], adapter_source="local") if speculate else None
    eng = _engine(served, speculation=spec)
    ids = {"a": str(served["root"] / "a"), "b": str(served["root"] / "b"), None: None}
    jobs = [(p, name) for p in PROMPTS for name in ("a", None, "b")]
    try:

        async def run():
            return await asyncio.gather(*(final_tokens(eng, _request(p, ids[n])) for p, n in jobs))

        got = asyncio.run(run())
    finally:
        eng.shutdown()
    for (prompt, name), tokens in zip(jobs, got):
        ref = served["hf"] if name is None else served["refs"][name]
        assert tokens == _hf_greedy(ref, prompt), (prompt, name)
    assert eng.adapters.loads == 2  # each adapter once, however many requests named it


def test_bf16_lora_tokens_independent_of_batch_and_speculation(served):
    """bfloat16: a LoRA request alone, inside a batch of other adapters, and with Medusa speculation on
    gives the same tokens, bitwise (the segmented LoRA matmul is row-invariant like the base kernels)."""
    a, b = str(served["root"] / "a"), str(served["root"] / "b")
    results = []
    for spec in (None, SpeculationConfig(adapter_id=served["medusa"], adapter_source="local")):
        eng = _engine(served, dtype="bfloat16", speculation=spec)
        try:
            alone = asyncio.run(final_tokens(eng, _request(PROMPTS[0], a, max_new=32)))

            async def crowd(eng=eng):
                others = [
                    final_tokens(eng, _request(p, n, max_new=32)) for p in PROMPTS[1:] for n in (b, None, a)
                ]
                return await asyncio.gather(final_tokens(eng, _request(PROMPTS[0], a, max_new=32)), *others)

            results += [alone, asyncio.run(crowd())[0]]
        finally:
            eng.shutdown()
    assert all(r == results[0] for r in results), results


@pytest.mark.parametrize("draft_vocab", [False, True])
def test_lm_head_lora_shapes_the_speculative_logits(tmp_path, draft_vocab):
    """v2 heads' logits ride in the step's lm_head call: a request's LoRA on lm_head applies to them too.
    Heads with a drafting vocabulary draft from its columns alone, except under such a LoRA."""
    from gorgon.adapters.medusa import MedusaConfig, MedusaHeads
    from gorgon.kernels.lora import lora_apply_reference
    from gorgon.speculative.draft_vocab import DraftVocab
    from gorgon.speculative.tree import CandidateTree

    hf = tiny_hf_model("llama")
    save_peft_adapter(hf, tmp_path / "lm", seed=3, std=0.2, **LORAS["qv-lmhead-rslora-r4"])
    model = gorgon_from_hf(hf)
    lora = load_lora_adapter(tmp_path / "lm", model.config, dtype=torch.float32, device=CPU)
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(num_heads=2, num_layers=1, version=2, hidden_size=64, vocab_size=320))
    if draft_vocab:
        heads.draft_vocab = DraftVocab(range(3, 320, 7), vocab_size=320)
    cache = KVCache(model.config, 512, torch.float32, CPU)
    runner = ModelRunner(model, cache, torch.float32, CPU, tree=CandidateTree.from_paths([(0,), (0, 0)]))
    alloc = SlotAllocator(512)
    prompt = [5, 6, 7, 8]
    seqs = [_seq(prompt, alloc, lora), _seq(prompt, alloc)]
    chunks = [ScheduledChunk(s, 0, prompt, False, True) for s in seqs]
    for c in chunks:
        c.draft_heads = heads
    out = runner.run(StepPlan(chunks))
    with torch.no_grad():
        lora_states, plain_states = (heads.hidden_states(h[-1:])[0] for h in out.hidden)  # (depth, H)
        without = model.lm_head(lora_states)
        w = lora.lm_head
        rows = torch.zeros(2, dtype=torch.long)
        want = lora_apply_reference(lora_states, without, rows, [w.a], [w.b_t], [w.scale])
        plain = model.lm_head(plain_states)
    if draft_vocab:
        assert out.draft_logits[1].vocab is heads.draft_vocab and out.draft_logits[0].vocab is None
        plain = plain[:, heads.draft_vocab.ids]
    torch.testing.assert_close(out.draft_logits[1].logits[0], plain.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.draft_logits[0].logits[0], want.float(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out.draft_logits[0].logits[0], without.float(), atol=1e-3)


def test_lora_with_its_own_medusa_heads(served, tmp_path):
    """A directory holding a LoRA and Medusa heads (jointly trained) speculates with its own heads, under
    the same rules as per-request Medusa adapters; greedy output stays the LoRA's."""
    import shutil

    from gorgon.errors import GenerationError

    joint = {}
    for name, kwargs in {"joint": {}, "joint_v1": {"version": 1}, "joint_2heads": {"heads": 2}}.items():
        heads_dir = make_medusa_adapter(tmp_path, f"heads_{name}", seed=11, **kwargs)
        shutil.copytree(served["root"] / "a", tmp_path / name)
        for f in ("config.json", "medusa_lm_head.safetensors"):
            shutil.copy(f"{heads_dir}/{f}", tmp_path / name / f)
        joint[name] = str(tmp_path / name)
    eng = _engine(served, speculation=SpeculationConfig(adapter_id=served["medusa"], adapter_source="local"))
    try:
        tokens = asyncio.run(final_tokens(eng, _request(PROMPTS[0], joint["joint"])))
        assert tokens == _hf_greedy(served["refs"]["a"], PROMPTS[0])
        loaded = asyncio.run(eng.adapters.get(joint["joint"], "local"))
        assert loaded.lora is not None and loaded.medusa is not None
        with pytest.raises(GenerationError, match="cannot be loaded per request"):
            asyncio.run(final_tokens(eng, _request(PROMPTS[0], joint["joint_v1"])))
        with pytest.raises(GenerationError, match="2 heads"):
            asyncio.run(final_tokens(eng, _request(PROMPTS[0], joint["joint_2heads"])))
    finally:
        eng.shutdown()
    plain = _engine(served)  # no default Medusa adapter: the LoRA serves, its heads stay unused
    try:
        assert asyncio.run(final_tokens(plain, _request(PROMPTS[0], joint["joint"]))) == tokens
        assert asyncio.run(plain.adapters.get(joint["joint"], "local")).medusa is None
    finally:
        plain.shutdown()


def test_default_lora_adapter(served):
    """`--adapter-id` naming a LoRA (as LoRAX allows): requests naming no adapter, or that one, get it; others
    name their own; the base model is not reachable by omission."""
    a, b = str(served["root"] / "a"), str(served["root"] / "b")
    eng = _engine(served, speculation=SpeculationConfig(adapter_id=a, adapter_source="local"))
    try:
        assert eng.adapter_id == a and eng.speculate == 0

        async def run():
            return await asyncio.gather(
                final_tokens(eng, _request(PROMPTS[0])),
                final_tokens(eng, _request(PROMPTS[0], a)),
                final_tokens(eng, _request(PROMPTS[0], b)),
            )

        default, named, other = asyncio.run(run())
    finally:
        eng.shutdown()
    assert default == named == _hf_greedy(served["refs"]["a"], PROMPTS[0])
    assert other == _hf_greedy(served["refs"]["b"], PROMPTS[0])


@pytest.mark.parametrize("family", ["mistral", "qwen2", "tied-mha"])
def test_greedy_equal_peft_for_each_family(family, tmp_path):
    """Through the whole engine, one batch: two LoRAs of different ranks and targets, and the base model."""
    _, hf = save_tiny_checkpoint(tmp_path / "model", family=family)
    refs = {
        "x": save_peft_adapter(hf, tmp_path / "x", seed=1, std=0.2, **LORAS["mlp-o-patterns"]),
        "y": save_peft_adapter(hf, tmp_path / "y", seed=2, std=0.2, **LORAS["qv-lmhead-rslora-r4"]),
    }
    eng = _engine({"root": tmp_path})
    jobs = [(p, n) for p in PROMPTS[:2] for n in ("x", None, "y")]
    try:

        async def run():
            ids = {n: str(tmp_path / n) for n in refs} | {None: None}
            return await asyncio.gather(*(final_tokens(eng, _request(p, ids[n])) for p, n in jobs))

        got = asyncio.run(run())
    finally:
        eng.shutdown()
    for (prompt, name), tokens in zip(jobs, got):
        assert tokens == _hf_greedy(hf if name is None else refs[name], prompt), (family, name)
