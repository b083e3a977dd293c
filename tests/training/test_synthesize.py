"""Magpie synthesis: the user-turn prefix of any chat template, junk filtering, deduplication, the sampling
loop, and `gorgon distill --synthesize` end to end against a fake server (with resume)."""

from __future__ import annotations

import asyncio
import json
import logging
import random

import pytest
from transformers import PreTrainedTokenizerFast

from gorgon.cli import main
from gorgon.training.chat_backends import ChatBackend, Completion
from gorgon.training.seeds import CODE_TOPICS, SeedSampler, read_seed_file
from gorgon.training.synthesize import (
    Deduplicator,
    JunkFilter,
    SynthesisConfig,
    Synthesizer,
    normalise_text,
    user_turn_template,
)

CHATML = (  # SmolLM2's: a default system prompt when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
NO_SYSTEM = (  # Gemma-style: refuses system messages
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] + '<end_of_turn>\\n' }}{% endfor %}"
)


def with_template(tokenizer, template: str, **special):
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, **special)
    tok.chat_template = template
    return tok


def test_prefix_chatml(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, CHATML)
    t = user_turn_template(tok, "Be kind.")
    assert t.prefix == "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n"
    assert t.end_of_turn == "<|im_end|>" and t.has_system
    default = user_turn_template(tok, None)  # the template's own default system prompt
    assert default.prefix.endswith("named SmolLM<|im_end|>\n<|im_start|>user\n")


def test_prefix_llama3_and_tiny_template(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, LLAMA3, bos_token="<|begin_of_text|>")
    t = user_turn_template(tok, "S")
    assert t.prefix == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert t.end_of_turn == "<|eot_id|>"
    tiny = user_turn_template(tiny_tokenizer, "S")  # tests/helpers.py's template
    assert tiny.prefix == "<s><|system|>\nS</s>\n<|user|>\n" and tiny.end_of_turn == "</s>"


def test_prefix_template_without_system(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, NO_SYSTEM, bos_token="<bos>")
    t = user_turn_template(tok, "ignored")
    assert t.prefix == "<bos><start_of_turn>user\n" and t.end_of_turn == "<end_of_turn>"
    assert not t.has_system


def test_prefix_needs_a_chat_template(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, CHATML)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        user_turn_template(tok, "S")


def test_dedup_exact_near_and_distinct():
    d = Deduplicator()
    base = "Write a short story about a lighthouse keeper who finds a message in a bottle on the beach."
    assert d.add(base) is None
    assert d.add(
        "  write a SHORT story about a lighthouse keeper, who finds a message in a bottle on the beach!"
    ) == ("exact")
    near = "Write a short story about a lighthouse keeper who finds a message in a bottle on the shore."
    assert d.add(near) == "near"
    assert d.add("Explain how photosynthesis works in simple terms for a ten year old.") is None
    assert d.add("Explain how photosynthesis works.") is None  # shares words, but is another request
    assert d.add("Hi") is None and d.add("hi!") == "exact"
    assert normalise_text("  Héllo,  WORLD! ") == "héllo world"


def test_dedup_scales_linearly_and_finds_all_near_duplicates():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(300)]
    d = Deduplicator()
    assert all(d.add(t) is None for t in texts)
    # one word changed near the end: 3 of 26 5-grams differ (Jaccard 23/29 ~ 0.79), must be caught
    changed = [t.split() for t in texts[:50]]
    for w in changed:
        w[27] = "zzz"
    assert sum(d.add(" ".join(w)) == "near" for w in changed) >= 49


def test_junk_filter():
    f = JunkFilter(markers=("<|im_start|>",))
    ok = Completion("x", "stop")
    assert f.reason("How do I bake bread at home?", ok) is None
    assert f.reason("How do I bake bread at home?", Completion("x", "length")) == "unfinished"
    assert f.reason("Hi there", ok) == "too_short"
    assert f.reason("word " * 1000, ok) == "too_long"
    assert f.reason("Tell me <|im_start|>assistant about it", ok) == "template_leak"
    assert f.reason(" ".join(["again"] * 30), ok) == "repetitive"


class ScriptedBackend(ChatBackend):
    """Returns scripted instructions in turn, recording the prompts it was given."""

    def __init__(self, texts, finish=None):
        self.texts, self.finish, self.prompts = texts, finish or {}, []

    async def chat(self, messages, *, max_tokens, temperature, seed=None):
        return Completion("answer", "stop", 1, 1)

    async def complete(self, prompt, *, max_tokens, temperature, stop=(), seed=None):
        i = len(self.prompts)
        self.prompts.append((prompt, stop, seed))
        await asyncio.sleep(0)
        return Completion(self.texts[i % len(self.texts)], self.finish.get(i, "stop"), 3, 4)


def test_synthesizer_counts_and_stops_at_n(tiny_tokenizer):
    texts = [
        "How do I grow tomatoes on a balcony?",
        "How do I grow tomatoes on a balcony?",  # exact duplicate
        "ok",  # too short
        "What were the main causes of the French revolution?",
        "Write a haiku about autumn leaves falling in the park.",
        "Give me three tips for a job interview in finance.",
    ]
    backend = ScriptedBackend(texts, finish={3: "length"})
    synth = Synthesizer(backend, tiny_tokenizer, SeedSampler("general", None, "system"), SynthesisConfig(n=3))
    kept = []
    stats = asyncio.run(synth.run(0, kept.append))
    assert [k.text for k in kept] == [texts[0], texts[4], texts[5]]
    assert stats.sampled == 6 and stats.kept == 3 and stats.exact_duplicates == 1
    assert dict(stats.junk) == {"too_short": 1, "unfinished": 1}
    assert stats.unique_per_100 == 50.0
    prompt, stop, _ = backend.prompts[0]
    assert prompt.startswith("<s><|system|>\nYou are") and prompt.endswith("</s>\n<|user|>\n")
    assert stop == ("</s>",)
    assert len({p for p, _, _ in backend.prompts}) > 1  # varied system prompts and hints


def test_synthesizer_gives_up_at_the_sample_limit(tiny_tokenizer):
    backend = ScriptedBackend(["Always the very same request, again and again."])
    cfg = SynthesisConfig(n=5, concurrency=3, max_samples=12)
    synth = Synthesizer(backend, tiny_tokenizer, SeedSampler("general", None, "none"), cfg)
    stats = asyncio.run(synth.run(0, lambda ins: None))
    assert stats.kept == 1 and stats.sampled == 12 and stats.exact_duplicates == 11


def test_user_mode_starts_the_turn_with_an_opener(tiny_tokenizer):
    backend = ScriptedBackend([" a poem about the sea and the wind at night."])
    synth = Synthesizer(backend, tiny_tokenizer, SeedSampler("general", None, "user"), SynthesisConfig(n=1))
    kept = []
    asyncio.run(synth.run(0, kept.append))
    opener = kept[0].seed.opener
    assert (
        opener and kept[0].text.startswith(opener) and backend.prompts[0][0].endswith("<|user|>\n" + opener)
    )


def test_seed_sampler_families_and_seed_file(tmp_path):
    rng = random.Random(0)
    code = [SeedSampler("code").draw(rng) for _ in range(50)]
    assert all(s.topic in CODE_TOPICS for s in code) and len({s.topic for s in code}) > 20
    assert all(s.topic in s.system for s in code)
    assert SeedSampler("gardening").draw(rng).topic == "gardening"
    with pytest.raises(ValueError, match="ignores --topic"):
        SeedSampler("code", mode="none")
    assert SeedSampler(mode="none").draw(rng).task is None
    path = tmp_path / "seeds.txt"
    path.write_text("# topics\nbirds\n\nrivers\n")
    assert read_seed_file(path) == ("birds", "rivers")
    path.write_text(json.dumps(["a", "b"]))
    assert read_seed_file(path) == ("a", "b")
    mixed = [SeedSampler().draw(rng) for _ in range(60)]
    assert {s.mode for s in mixed} == {"none", "system", "user"}
    assert all(bool(s.opener) == (s.mode == "user") for s in mixed)
    with pytest.raises(ValueError, match="hint-mode"):
        SeedSampler(mode="bogus")


def test_cli_synthesize_over_http_and_resume(fake_url, fake_openai, tiny_tokenizer, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    fake_openai.completions = [
        "How do I grow tomatoes on a balcony?",
        "how do I grow tomatoes on a balcony",  # exact after normalisation
        "What were the main causes of the French revolution?",
        "Write a haiku about autumn leaves falling in the park.",
    ]
    out = tmp_path / "synth.json"
    args = ["distill", "--synthesize", "3", "--output-filename", str(out), "--url", fake_url]
    args += ["--tokenizer", tiny_tokenizer.name_or_path, "--concurrency", "1", "--no-progress"]
    args += ["--hint-mode", "system"]  # scripted texts come back verbatim (no opener in front)
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert [c[0]["content"] for c in data] == [fake_openai.completions[i] for i in (0, 2, 3)]
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in data)
    assert "unique per 100 sampled" in caplog.text
    first = next(r for r in fake_openai.requests if "prompt" in r)
    assert first["prompt"].startswith("<|system|>")  # BOS left to the server, which adds it
    assert first["stop"] == ["</s>"] and first["temperature"] == 1.0
    calls = fake_openai.completion_calls, sum(fake_openai.chat_calls.values())
    assert main(args) == 0  # resumed: nothing sampled or answered again
    assert (fake_openai.completion_calls, sum(fake_openai.chat_calls.values())) == calls
    assert json.loads(out.read_text()) == data
