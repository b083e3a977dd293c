"""The published `lorax-client` against a live Gorgon server.

`lorax-client` pins old `certifi` / `huggingface-hub`, so it lives in its own virtual environment: created
once under $GORGON_LORAX_VENV (default: `.venv-lorax` in the repository root, git-ignored) with
`python -m venv` + `pip install lorax-client`. The test skips when pip cannot reach the package index.
A script run by that environment's Python calls the client and prints JSON, which the test checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import serve

from gorgon.server.app import create_app

REPO_ROOT = Path(__file__).resolve().parents[2]
# Fail fast (then skip) where the package index cannot be reached.
PIP_OPTIONS = ("--quiet", "--disable-pip-version-check", "--retries", "1", "--timeout", "30")

CLIENT_SCRIPT = r"""
import json, sys
from lorax import Client
from lorax.errors import ValidationError, GenerationError

client = Client(sys.argv[1], timeout=60)
out = {}
r = client.generate("Hello", max_new_tokens=5, details=True)
out["generate"] = {"generated_text": r.generated_text, "details": r.details.model_dump(mode="json")}
r = client.generate("Hello", max_new_tokens=3, details=False)
out["plain"] = {"generated_text": r.generated_text, "details": r.details}
events = list(client.generate_stream("Hello", max_new_tokens=5, details=True))
out["stream"] = [e.model_dump(mode="json") for e in events]
r = client.generate("Hello", max_new_tokens=3, best_of=2, do_sample=True, details=True)
out["best_of"] = r.details.model_dump(mode="json")
for name, call in {
    "too_long": lambda: client.generate("Hello", max_new_tokens=100000),
    "bad_adapter": lambda: client.generate("Hello", max_new_tokens=2, adapter_id="missing/adapter"),
    "stream_too_long": lambda: list(client.generate_stream("Hello", max_new_tokens=100000)),
}.items():
    try:
        call()
        out[name] = None
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


@pytest.fixture(scope="session")
def lorax_python() -> Path:
    venv = Path(os.environ.get("GORGON_LORAX_VENV", REPO_ROOT / ".venv-lorax"))
    python = venv / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([python, "-c", "import lorax"], check=False, capture_output=True).returncode == 0
    ):
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
    try:
        pip = subprocess.run(
            [python, "-m", "pip", "install", *PIP_OPTIONS, "lorax-client"],
            check=False,
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not install lorax-client within 15 minutes (no package index?)")
    if pip.returncode != 0:
        lines = (pip.stderr or pip.stdout).strip().splitlines()
        pytest.skip(
            f"pip could not install lorax-client (no package index?): {lines[-1] if lines else pip.returncode}"
        )
    return python


def run_client(python: Path, url: str, tmp_path: Path) -> dict:
    script = tmp_path / "lorax_client_check.py"
    script.write_text(CLIENT_SCRIPT)
    done = subprocess.run(
        [python, str(script), url], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_lorax_client_fake_engine(lorax_python, fake_engine, tmp_path):
    with serve(create_app(fake_engine)) as url:
        out = run_client(lorax_python, url, tmp_path)
    expected5 = fake_engine.expected_text(5)

    gen = out["generate"]
    assert gen["generated_text"] == expected5
    d = gen["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 5 and d["seed"] is None
    assert d["prompt_tokens"] == len(fake_engine.requests[0].prompt_ids) and d["prefill"] == []
    assert "".join(t["text"] for t in d["tokens"]) == expected5
    assert all(isinstance(t["logprob"], float) and t["special"] is False for t in d["tokens"])
    # Newer clients also read `skipped` / `skipped_tokens`; older ones (0.6.x) drop them.
    if "skipped_tokens" in d:
        assert d["skipped_tokens"] == 0
    assert all(t.get("skipped", False) is False for t in d["tokens"])
    assert out["plain"] == {"generated_text": fake_engine.expected_text(3), "details": None}

    stream = out["stream"]
    assert len(stream) == 5 and "".join(e["token"]["text"] for e in stream) == expected5
    assert all(e["generated_text"] is None and e["details"] is None for e in stream[:-1])
    assert stream[-1]["generated_text"] == expected5
    assert (
        stream[-1]["details"]["finish_reason"] == "length" and stream[-1]["details"]["generated_tokens"] == 5
    )

    best = out["best_of"]
    assert len(best["best_of_sequences"]) == 1 and best["seed"] is not None

    assert out["too_long"][0] == "ValidationError" and "`max_new_tokens`" in out["too_long"][1]
    assert out["stream_too_long"][0] == "ValidationError"
    assert (
        out["bad_adapter"][0] == "GenerationError"
        and "Request failed during generation" in out["bad_adapter"][1]
    )


def test_lorax_client_real_engine(lorax_python, real_engine, tmp_path):
    with serve(create_app(real_engine)) as url:
        out = run_client(lorax_python, url, tmp_path)
    gen, stream = out["generate"], out["stream"]
    d = gen["details"]
    assert d["generated_tokens"] == len(d["tokens"]) == len(stream) and 1 <= len(stream) <= 5
    assert d["prompt_tokens"] == len(real_engine.tokenizer("Hello")["input_ids"])
    # Greedy decoding: the stream repeats the answer token for token.
    assert [e["token"]["id"] for e in stream] == [t["id"] for t in d["tokens"]]
    assert stream[-1]["generated_text"] == gen["generated_text"]
    assert stream[-1]["details"]["finish_reason"] == d["finish_reason"]
    assert len(out["best_of"]["best_of_sequences"]) == 1
    assert out["too_long"][0] == "ValidationError" and out["stream_too_long"][0] == "ValidationError"
    # Adapters are the engine's call: it may serve the request or refuse it as a generation error.
    assert out["bad_adapter"] is None or out["bad_adapter"][0] == "GenerationError"
