"""`/tokenize`, `/health`, `/info`, `/metrics`, `/docs`, and the SSE / stop-filter helpers."""

from __future__ import annotations

import pytest
from helpers import SMALL_CONFIG

from gorgon.errors import OverloadedError
from gorgon.server.stream import StopTextFilter, apply_stop_filter, error_event, sse


def test_tokenize(client, tiny_tokenizer):
    text = "Hello wörld"
    r = client.post("/tokenize", json={"inputs": text})
    assert r.status_code == 200
    tokens = r.json()
    assert [t["id"] for t in tokens] == tiny_tokenizer(text)["input_ids"]
    assert tokens[0] == {"id": tiny_tokenizer.bos_token_id, "text": "<s>", "start": 0, "stop": 0}
    for t in tokens[1:]:
        assert set(t) == {"id", "text", "start", "stop"}
        assert t["text"] == text[t["start"] : t["stop"]]
    assert tokens[-1]["stop"] == len(text)
    plain = client.post("/tokenize", json={"inputs": text, "add_special_tokens": False}).json()
    assert plain == tokens[1:]


def test_health(client, fake_engine):
    r = client.get("/health")
    assert r.status_code == 200 and r.content == b""
    fake_engine.healthy = False
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"error": "unhealthy", "error_type": "healthcheck"}


def test_info(client):
    info = client.get("/info").json()
    assert info["model_id"] == "fake/tiny-model"
    assert info["model_dtype"] == "torch.float32" and info["model_device_type"] == "cpu"
    for key in ("max_input_length", "max_total_tokens", "max_batch_total_tokens", "max_concurrent_requests"):
        assert info[key] == getattr(SMALL_CONFIG, key)
    assert info["max_stop_sequences"] == SMALL_CONFIG.max_stop_sequences
    assert info["version"] and info["speculate"] == 0


def test_metrics(client, fake_engine):
    client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    client.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    client.post("/generate", json={"inputs": "Hi", "parameters": {"top_k": 0}})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'gorgon_requests_total{route="/generate",status="200"} 1.0' in text
    assert 'gorgon_requests_total{route="/generate",status="422"} 1.0' in text
    assert 'gorgon_requests_total{route="/generate_stream",status="200"} 1.0' in text
    assert 'gorgon_request_duration_seconds_count{route="/generate"} 2.0' in text
    assert "gorgon_time_to_first_token_seconds_count 2.0" in text
    assert "gorgon_generated_tokens_total 5.0" in text
    assert "gorgon_queue_size 0.0" in text and "gorgon_batch_current_size 0.0" in text


def test_metrics_are_per_app(tiny_tokenizer):
    from fake_engine import FakeEngine
    from fastapi.testclient import TestClient

    from gorgon.server.app import create_app

    with TestClient(create_app(FakeEngine(tiny_tokenizer))) as c:
        assert "gorgon_generated_tokens_total 0.0" in c.get("/metrics").text


def test_docs(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/tokenize"):
        assert p in paths


def test_sse_formatting():
    assert sse({"a": 1}) == b'data:{"a": 1}\n\n'
    assert sse("[DONE]", space=True) == b"data: [DONE]\n\n"
    assert (
        error_event(OverloadedError())
        == b'data:{"error": "Model is overloaded", "error_type": "overloaded"}\n\n'
    )


@pytest.mark.parametrize(
    "pieces, stops, sent, final",
    [
        (["Hello", " wor", "ld"], [], ["Hello", " wor", "ld"], ""),
        (["Hel", "lo\n", "more"], ["\n"], ["Hel", "lo", ""], ""),
        # "EN" could begin "END": held back, then released when it turns out not to.
        (["abc EN", "X"], ["END"], ["abc ", "ENX"], ""),
        (["abc EN", "D tail"], ["END"], ["abc ", ""], ""),
        (["abc E"], ["END"], ["abc "], "E"),  # generation ended for another reason: flush the tail
        (["xx", "STOP", "yy"], ["ST", "STOP"], ["xx", "", ""], ""),
    ],
)
def test_stop_filter(pieces, stops, sent, final):
    f = StopTextFilter(stops)
    assert [f.push(p) for p in pieces] == sent
    assert f.finish() == final


def test_apply_stop_filter():
    assert apply_stop_filter("one two. three", [".", "three"]) == "one two"
    assert apply_stop_filter("nothing", ["x"]) == "nothing"
