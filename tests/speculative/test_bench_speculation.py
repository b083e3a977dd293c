"""`gorgon bench` speculation mode: interleaved rounds, median speedup, identical outputs."""

import json

import gorgon.bench.run as bench_run


def test_interleaved_alternates_engines_and_sums(monkeypatch):
    calls = []

    def fake_run(engine, prompts, max_new, concurrency, ignore_eos=True):
        calls.append((engine, len(prompts), concurrency))
        return {
            "tokens": 10 * len(prompts),
            "seconds": 1.0 if engine == "a" else 2.0,
            "outputs": {key: [7] for key in range(len(prompts))},
        }

    monkeypatch.setattr(bench_run, "run_engine", fake_run)
    out = bench_run.interleaved({"a": "a", "b": "b"}, [[[1]], [[2]], [[3]]], 5, 1)
    assert [c[0] for c in calls] == ["a", "b", "b", "a", "a", "b"]  # ABBA: drift falls on both alike
    assert out["a"]["tok_s"] == 10.0 and out["b"]["tok_s"] == 5.0
    assert out["a"]["outputs"] == {0: [7], 1: [7], 2: [7]}
    calls.clear()
    batch = bench_run.interleaved({"a": "a", "b": "b"}, [[[1], [2]]], 5, 2)
    assert calls == [("a", 2, 2), ("b", 2, 2)] and batch["a"]["tokens"] == 20


def test_median_round_and_ratios():
    def rnd(plain, spec):
        return {"plain": {"tok_s": plain}, "speculative": {"tok_s": spec}}

    rounds = [rnd(10, 13), rnd(10, 11), rnd(10, 12)]
    assert bench_run._median_round(rounds) is rounds[2]
    assert bench_run._ratios(rounds) == "1.30 1.10 1.20"


def test_pooled_speedup_weighs_rounds_by_their_time():
    def rnd(plain_tokens, plain_s, spec_tokens, spec_s):
        return {
            "plain": {"tokens": plain_tokens, "seconds": plain_s},
            "speculative": {"tokens": spec_tokens, "seconds": spec_s},
        }

    # 300 tokens in 3 s plain (100/s) vs 300 tokens in 2 s with drafts (150/s): 1.5x, not the mean ratio.
    rounds = [rnd(100, 1.0, 100, 1.0), rnd(200, 2.0, 200, 1.0)]
    assert bench_run._pooled_speedup(rounds) == 1.5


def test_bench_speculation_cli_end_to_end(tmp_path, capsys):
    from helpers import make_medusa_adapter, save_tiny_checkpoint

    from gorgon.cli import main

    model_dir = tmp_path / "model"
    save_tiny_checkpoint(model_dir)
    make_medusa_adapter(tmp_path, "adapter", heads=2)
    out = tmp_path / "bench.json"
    argv = [
        "bench",
        "--model-id",
        str(model_dir),
        "--dtypes",
        "float32",
        "--adapter-id",
        str(tmp_path / "adapter"),
    ]
    argv += ["--adapter-source", "local", "--prompts", "2", "--max-new-tokens", "12", "--concurrency", "2"]
    argv += ["--repeats", "2", "--output", str(out)]
    assert main(argv) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["greedy_outputs_identical"] is True
    assert len(row["single_speedup_rounds"].split()) == 2 and row["single_speedup"] > 0
    assert len(row["x2_speedup_rounds"].split()) == 6 and row["x2_speedup_pooled"] > 0  # 3 x --repeats
    assert row["mean_tokens_per_step"] >= 1.0
