"""The in-process backend on a tiny real engine: same answers as the engine given the rendered chat, the
model's earlier answers in the context of later turns, limits reported as permanent errors; and the CLI."""

from __future__ import annotations

import asyncio
import json

import pytest

from gorgon.cli import main
from gorgon.engine.request import FinalOutput, GenerationRequest, SamplingParams, StoppingParams
from gorgon.training.chat_backends import EngineChatBackend, PermanentError
from gorgon.training.conversations import Conversation
from gorgon.training.distill import ReplayOptions, replay


def run(coro):
    return asyncio.run(coro)


async def greedy_text(engine, messages, max_new):
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    request = GenerationRequest(list(ids), SamplingParams(), StoppingParams(max_new_tokens=max_new))
    async for out in engine.generate(request):
        if isinstance(out, FinalOutput):
            return out.generated_text


def test_replay_matches_the_engine_turn_by_turn(tiny_engine):
    conv = Conversation(
        (
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello world!"},
            {"role": "assistant", "content": "ignored dataset answer"},
            {"role": "user", "content": "The quick brown fox?"},
        )
    )

    async def go():
        backend = EngineChatBackend(tiny_engine)
        r = await replay(backend, conv, ReplayOptions(max_tokens=6, concurrency=2))
        first = await greedy_text(tiny_engine, list(conv.messages[:2]), 6)
        second = await greedy_text(tiny_engine, [*conv.messages[:2], r.messages[2], conv.messages[3]], 6)
        return r, first, second

    r, first, second = run(go())
    assert [m["role"] for m in r.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert r.messages[2]["content"] == first  # the first answer is the engine's, the dataset's is gone
    assert r.messages[4]["content"] == second  # ...and it is the context of the second turn
    assert r.tokens > 0


def test_concurrent_requests_give_the_same_answers(tiny_engine):
    messages = [[{"role": "user", "content": f"Hello {i}"}] for i in range(6)]

    async def go():
        backend = EngineChatBackend(tiny_engine)
        alone = [await backend.chat(m, max_tokens=8, temperature=0.0) for m in messages]
        together = await asyncio.gather(*(backend.chat(m, max_tokens=8, temperature=0.0) for m in messages))
        return alone, together

    alone, together = run(go())
    assert [c.text for c in alone] == [c.text for c in together]


def test_complete_stops_and_cuts_the_stop_sequence(tiny_engine):
    async def go():
        backend = EngineChatBackend(tiny_engine)
        free = await backend.complete("<s><|user|>\n", max_tokens=20, temperature=0.0)
        stop = free.text[3:6]
        cut = await backend.complete("<s><|user|>\n", max_tokens=20, temperature=0.0, stop=(stop,))
        return free, stop, cut

    free, stop, cut = run(go())
    assert len(stop) == 3, free  # the deterministic tiny model writes at least 6 characters
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert free.text.startswith(cut.text)


def test_prompt_over_the_limit_is_permanent(tiny_engine):
    async def go():
        backend = EngineChatBackend(tiny_engine)
        await backend.chat([{"role": "user", "content": "word " * 400}], max_tokens=4, temperature=0.0)

    with pytest.raises(PermanentError, match="max-input-length"):
        run(go())


def test_cli_in_process(tiny_model_dir, tmp_path):
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Hello"}]}] * 1))
    out = tmp_path / "out.json"
    args = ["distill", "--model-id", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu"]
    args += [
        "--input-filename",
        str(inp),
        "--output-filename",
        str(out),
        "--max-tokens",
        "5",
        "--no-progress",
    ]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert len(data) == 1 and [m["role"] for m in data[0]] == ["user", "assistant"]


@pytest.mark.parametrize("stop_loops", [False, True])
def test_gorgon_server_and_in_process_give_the_same_answers(tiny_engine, stop_loops):
    """Replaying over HTTP against Gorgon's own server equals replaying in-process (greedy), streamed
    (--stop-loops) or not, and its completions endpoint takes the Magpie request (prompt, stop, seed,
    temperature)."""
    from helpers import serve

    from gorgon.server.app import create_app
    from gorgon.training.chat_backends import HttpChatBackend

    conv = Conversation(
        ({"role": "user", "content": "Hello world!"}, {"role": "user", "content": "How are you?"})
    )
    opts = ReplayOptions(max_tokens=40, stop_loops=stop_loops)

    async def go(url):
        http = HttpChatBackend(url)
        try:
            over_http = await replay(http, conv, opts)
            sampled = await http.complete("<|user|>\n", max_tokens=5, temperature=1.0, stop=("</s>",), seed=3)
        finally:
            await http.aclose()
        local = await replay(EngineChatBackend(tiny_engine), conv, opts)
        return over_http, local, sampled

    with serve(create_app(tiny_engine)) as url:
        over_http, local, sampled = run(go(url))
    assert over_http.messages == local.messages
    assert sampled.completion_tokens > 0 and sampled.finish_reason in ("stop", "length")


def test_stop_loops_in_process_stops_the_request_where_the_loop_begins(tiny_engine):
    """In-process, --stop-loops reads the engine's token stream and closes it at the loop (the engine
    aborts the request): the answer is what `prepare` keeps of the full one, marked "loop"."""
    from fake_openai import loop_words

    from gorgon.engine.request import TokenOutput
    from gorgon.training.prepare import loop_start

    class LoopingEngine:
        """Streams the fake server's looping answer, one word per token, and records how far it got."""

        config, tokenizer = tiny_engine.config, tiny_engine.tokenizer
        sent, closed = 0, False

        async def generate(self, request):
            try:
                for piece in loop_words(request.stopping.max_new_tokens):
                    self.sent += 1
                    yield TokenOutput(0, piece, 0.0, False, False, ())
            finally:
                LoopingEngine.closed = True

    engine = LoopingEngine()
    backend = EngineChatBackend(engine)
    messages = [{"role": "user", "content": "Hi"}]
    full = "".join(loop_words(200))
    got = run(backend.chat(messages, max_tokens=200, temperature=0.0, stop_loops=True))
    assert got.finish_reason == "loop" and got.truncated
    assert got.text == full[: loop_start(full)].rstrip()
    assert engine.sent < 100 and LoopingEngine.closed  # of 200
    assert got.completion_tokens == engine.sent
