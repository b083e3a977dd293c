"""Training-file preparation: cut answers lose their loop, tuning prompts stay out."""

from gorgon.training.prepare import LoopWatch, loop_start, prepare, stuck

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


def test_loop_watch_stops_a_stuck_answer_where_prepare_cuts_it():
    text = "Intro words here. " + LOOP * 3  # 183 words: one 10-word sentence over and over
    watch = LoopWatch(every=4)
    cuts = [watch.feed(w + " ") for w in text.split()]
    first = next(i for i, c in enumerate(cuts) if c is not None)
    assert cuts[first] == loop_start(text)  # the same place `prepare` cuts the capped answer
    # Stopped once the last 48 eight-word runs all repeated earlier ones: the repeats start at word 13, so
    # at 13 + 48 + 7 = 68 words (a check falls there).
    assert first + 1 == 68 and watch.pieces == len(text.split())
    assert stuck(text) and not stuck(text.split("lovely.")[0] + "lovely.")


def test_a_finished_answer_that_repeats_a_phrase_is_not_stuck():
    # Code and lists repeat whole lines; that is not a loop unless nothing new follows.
    line = "result = compute the value for this item and store it "
    answer = " ".join(f"step {i}: {line}" for i in range(12))
    assert loop_start(answer) is not None  # prepare would cut it, were it capped...
    watch = LoopWatch(every=1)
    assert all(watch.feed(w + " ") is None for w in answer.split())  # ...but it is never stuck


def test_prepare_cuts_each_answer_by_its_own_flag_and_reads_old_records():
    conv = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": LOOP},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": LOOP},
    ]
    (first_cut,), _ = prepare(
        [{"messages": conv, "truncated": True, "truncated_turns": [True, False]}], set()
    )
    assert first_cut[1]["content"] != LOOP and first_cut[3]["content"] == LOOP
    # A record written before per-answer flags: its flag is the last answer's (as single-turn runs were).
    (old,), _ = prepare([{"messages": conv, "truncated": True}], set())
    assert old[1]["content"] == LOOP and old[3]["content"] != LOOP
    # Any answer too short drops the conversation.
    short = conv[:3] + [{"role": "assistant", "content": "ok"}]
    assert prepare([{"messages": short[:2] + conv[2:]}, {"messages": short}], set())[1]["dropped_short"] == 1
