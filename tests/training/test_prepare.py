"""Training-file preparation: cut answers lose their loop, tuning prompts stay out."""

from gorgon.training.prepare import LoopWatch, loop_start, prepare

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


def test_loop_watch_reports_the_loop_as_it_streams_in():
    text = "Intro words here. " + LOOP
    watch = LoopWatch(every=4)
    cuts = [watch.feed(w + " ") for w in text.split()]
    first = next(i for i, c in enumerate(cuts) if c is not None)
    assert cuts[first] == loop_start(text)  # the same place `prepare` cuts
    assert (first + 1) % 4 == 0 and first < 40  # found at a check, early in the second round of the sentence
    assert watch.pieces == len(text.split())
    plain = LoopWatch(every=1)
    assert all(
        plain.feed(w + " ") is None for w in ["no", "repetition", "in", "these", "few", "distinct", "words"]
    )
