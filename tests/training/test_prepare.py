"""Training-file preparation: cut answers lose their loop, tuning prompts stay out."""

from gorgon.training.prepare import loop_start, prepare

LOOP = "Paris is the capital of France and it is lovely. " * 6


def test_loop_start_finds_the_second_occurrence():
    cut = loop_start("Intro words here. " + LOOP)
    assert cut is not None
    assert ("Intro words here. " + LOOP)[:cut].rstrip().endswith("lovely.")
    assert loop_start("A plain answer without any repetition at all, just words that differ.") is None


def test_prepare_trims_cut_answers_and_excludes_prompts():
    records = [
        {
            "messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": LOOP}],
            "truncated": True,
        },
        {
            "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": LOOP}],
            "truncated": False,
        },
        {"messages": [{"role": "user", "content": "tune"}, {"role": "assistant", "content": "x" * 50}]},
        {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "ok"}]},
    ]
    out, counts = prepare(records, {"tune"})
    assert counts == {"kept": 2, "trimmed": 1, "dropped_excluded": 1, "dropped_short": 1}
    assert out[0][1]["content"] == "Paris is the capital of France and it is lovely."
    assert out[1][1]["content"] == LOOP  # an answer that ended keeps its repetitions
