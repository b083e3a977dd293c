"""Replaying conversations against an OpenAI-compatible server: the model's own answers turn by turn, retries,
no partial conversations, resuming, truncated answers."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

from fake_openai import BROKEN, FLAKY, LONG, LOOP, REFUSED, fake_answer, loop_words

from gorgon.cli import main
from gorgon.training.chat_backends import HttpChatBackend, RetryPolicy, TransientError, call_with_retries

FAST = ["--retries", "3", "--retry-backoff", "0.01", "--no-progress"]


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def distill(url, inp, out, *extra):
    return main(
        ["distill", "--url", url, "--input-filename", str(inp), "--output-filename", str(out), *FAST, *extra]
    )


def sharegpt(*turns, system=None):
    conv = [{"from": "system", "value": system}] if system else []
    for t in turns:
        conv += [{"from": "human", "value": t}, {"from": "gpt", "value": "DATASET ANSWER"}]
    return {"conversations": conv}


def test_multi_turn_replay_uses_the_models_own_answers(fake_url, fake_openai, tmp_path):
    inp = write_jsonl(
        tmp_path / "in.jsonl", [sharegpt("Hi", "And then?", system="Be brief."), sharegpt("Solo")]
    )
    out = tmp_path / "out.json"
    assert distill(fake_url, inp, out, "--max-tokens", "7") == 0
    data = json.loads(out.read_text())
    first_answer = fake_answer([{"role": "user", "content": "Hi"}])
    assert data[0] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "reply 2 to <And then?> after " + str([first_answer])},
    ]
    assert data[1] == [
        {"role": "user", "content": "Solo"},
        {"role": "assistant", "content": fake_answer([{"role": "user", "content": "Solo"}])},
    ]
    assert "DATASET ANSWER" not in out.read_text()
    second_turn = next(r for r in fake_openai.requests if r["messages"][-1]["content"] == "And then?")
    assert second_turn["messages"][0] == {"role": "system", "content": "Be brief."}
    assert second_turn["max_tokens"] == 7 and second_turn["temperature"] == 0.0
    assert "seed" not in second_turn  # greedy


def test_transient_errors_are_retried(fake_url, fake_openai, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [sharegpt(f"{FLAKY} question")])
    out = tmp_path / "out.json"
    assert distill(fake_url, inp, out) == 0
    assert fake_openai.chat_calls[f"{FLAKY} question"] == 3  # two 500s, then the answer
    assert len(json.loads(out.read_text())) == 1


def test_a_failing_conversation_is_left_out_whole_and_counted(fake_url, fake_openai, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    records = [
        sharegpt("fine"),
        sharegpt("first turn ok", f"{BROKEN} second turn"),  # fails after one answered turn
        sharegpt(f"{REFUSED} too long"),
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.json"
    assert distill(fake_url, inp, out) == 1
    data = json.loads(out.read_text())
    assert [c[0]["content"] for c in data] == ["fine"]  # nothing of the failed ones, not even turn one
    done = (tmp_path / "out.json.done.jsonl").read_text()
    assert "first turn ok" not in done and "too long" not in done
    assert fake_openai.chat_calls[f"{BROKEN} second turn"] == 4  # 1 try + 3 retries
    assert fake_openai.chat_calls[f"{REFUSED} too long"] == 1  # a 4xx is not retried
    assert "2 left out (1 after retries, 1 refused)" in caplog.text


def test_rerun_skips_finished_conversations_and_retries_failed_ones(fake_url, fake_openai, tmp_path):
    fake_openai.flaky_failures = 4  # more than the retries of the first run
    inp = write_jsonl(tmp_path / "in.jsonl", [sharegpt("a"), sharegpt("b", "c"), sharegpt(f"{FLAKY} d")])
    out = tmp_path / "out.json"
    assert distill(fake_url, inp, out) == 1
    assert len(json.loads(out.read_text())) == 2
    calls_before = sum(fake_openai.chat_calls.values())
    assert distill(fake_url, inp, out) == 0  # the flaky one now answers on its first retry
    assert sum(fake_openai.chat_calls.values()) - calls_before == 1
    assert [c[1]["content"][:7] for c in json.loads(out.read_text())] == ["reply 1"] * 3
    calls_before = sum(fake_openai.chat_calls.values())
    assert distill(fake_url, inp, out) == 0
    assert sum(fake_openai.chat_calls.values()) == calls_before  # all done: no request at all
    assert [c[0]["content"] for c in json.loads(out.read_text())] == ["a", "b", f"{FLAKY} d"]  # input order


def test_truncated_answers_are_kept_and_counted_or_dropped(fake_url, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    inp = write_jsonl(tmp_path / "in.jsonl", [sharegpt("short"), sharegpt(f"{LONG} essay")])
    out = tmp_path / "out.json"
    assert distill(fake_url, inp, out) == 0
    assert len(json.loads(out.read_text())) == 2
    assert "1 with an answer cut at --max-tokens: kept" in caplog.text
    assert distill(fake_url, inp, out, "--drop-truncated") == 0  # reassembled from the sidecar, no requests
    assert [c[0]["content"] for c in json.loads(out.read_text())] == ["short"]


def test_sampling_sends_a_reproducible_seed(fake_url, fake_openai, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [sharegpt("x", "y")])
    assert distill(fake_url, inp, tmp_path / "out.json", "--temperature", "0.7") == 0
    seeds = [r["seed"] for r in fake_openai.requests]
    assert len(set(seeds)) == 2 and all(r["temperature"] == 0.7 for r in fake_openai.requests)


def test_server_down_leaves_everything_out(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inp = write_jsonl(tmp_path / "in.jsonl", [sharegpt("a")])
    out = tmp_path / "out.json"
    assert distill(f"http://127.0.0.1:{port}/v1", inp, out, "--retries", "1") == 1
    assert json.loads(out.read_text()) == []


def test_http_backend_url_and_model_field(fake_url, fake_openai):
    async def go():
        backend = HttpChatBackend(fake_url + "/v1/", model="my-model")
        c = await backend.chat([{"role": "user", "content": "q"}], max_tokens=3, temperature=0.0)
        await backend.aclose()
        return c

    c = asyncio.run(go())
    assert c.text.startswith("reply 1") and not c.truncated and c.completion_tokens == 5
    assert fake_openai.requests[-1]["model"] == "my-model"


def test_call_with_retries_gives_up_after_attempts():
    calls = []

    async def failing():
        calls.append(1)
        raise TransientError("nope")

    async def go():
        try:
            await call_with_retries(failing, RetryPolicy(attempts=3, base_delay=0.0), "x")
        except TransientError:
            return True
        return False

    assert asyncio.run(go()) and len(calls) == 3


def test_stop_loops_streams_and_keeps_what_prepare_would_keep(fake_url, fake_openai, tmp_path):
    """--stop-loops: each answer is streamed and abandoned where its loop begins; the record holds the
    text before the loop (what `prepare` keeps of the full answer), marked cut; answers without a loop
    are the same as unstreamed ones."""
    from gorgon.training.prepare import loop_start

    inp = write_jsonl(tmp_path / "in.jsonl", [sharegpt(f"{LOOP} please"), sharegpt("Plain")])
    out = tmp_path / "out.json"
    assert distill(fake_url, inp, out, "--max-tokens", "300", "--stop-loops") == 0
    data = json.loads(out.read_text())
    full = "".join(loop_words(300))
    assert data[0][1]["content"] == full[: loop_start(full)].rstrip()
    assert data[0][1]["content"].startswith("Here is my answer to that. The same eight words")
    assert data[1][1]["content"] == fake_answer([{"role": "user", "content": "Plain"}])
    assert all(r["stream"] for r in fake_openai.requests)
    # The looping answer was abandoned long before its 300 words (the server noticed the hang-up).
    assert max(fake_openai.streamed_pieces) < 200  # of 300 (a few dozen may be sent before it notices)
    records = [json.loads(line) for line in (tmp_path / "out.json.done.jsonl").read_text().splitlines()]
    cut = {r["messages"][0]["content"]: r["truncated"] for r in records}
    assert cut == {f"{LOOP} please": True, "Plain": False}
    assert {r["messages"][0]["content"]: r["truncated_turns"] for r in records} == {
        f"{LOOP} please": [True],
        "Plain": [False],
    }
    assert all(r["settings"]["stop_loops"] is True for r in records)


def test_each_answer_of_a_conversation_records_whether_it_was_cut(fake_url, fake_openai, tmp_path):
    """A second turn after a looping first answer: the record says which answer was stopped, so `prepare`
    cuts the loop out of that one and leaves the other alone."""
    from gorgon.training.prepare import loop_start, prepare

    inp = write_jsonl(tmp_path / "in.jsonl", [sharegpt(f"{LOOP} please", "Shorter?")])
    out = tmp_path / "out.json"
    assert distill(fake_url, inp, out, "--max-tokens", "300") == 0
    (rec,) = [json.loads(line) for line in (tmp_path / "out.json.done.jsonl").read_text().splitlines()]
    assert rec["truncated"] is True and rec["truncated_turns"] == [True, False]
    (kept,), counts = prepare([rec], set())
    full = "".join(loop_words(300)).rstrip()
    assert kept[1]["content"] == full[: loop_start(full)].rstrip() and counts["trimmed"] == 1
    assert kept[3]["content"] == rec["messages"][3]["content"]  # the second answer ended: untouched


def test_without_stop_loops_the_whole_loop_is_generated(fake_url, fake_openai, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [sharegpt(f"{LOOP} please")])
    out = tmp_path / "out.json"
    assert distill(fake_url, inp, out, "--max-tokens", "300") == 0
    assert json.loads(out.read_text())[0][1]["content"] == "".join(loop_words(300))
    assert not any(r.get("stream") for r in fake_openai.requests)
    record = json.loads((tmp_path / "out.json.done.jsonl").read_text().splitlines()[0])
    assert "stop_loops" not in record["settings"]  # stores from before the option still resume


def test_stop_loops_streams_retry_and_refusals_like_plain_requests(fake_url, fake_openai, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [sharegpt(f"{FLAKY} a"), sharegpt(f"{REFUSED} b")])
    out = tmp_path / "out.json"
    assert distill(fake_url, inp, out, "--stop-loops") == 1  # one conversation left out
    data = json.loads(out.read_text())
    assert [c[0]["content"] for c in data] == [f"{FLAKY} a"]  # retried after two 500s; the 422 left out
    assert fake_openai.chat_calls[f"{FLAKY} a"] == 3 and fake_openai.chat_calls[f"{REFUSED} b"] == 1
