import json
import random
import sys
from pathlib import Path

import pytest

from gorgon.bench.prompts import PROMPT_SETS
from gorgon.training import compose
from gorgon.training.conversations import load_conversations


@pytest.mark.parametrize("family", ["general", "code", "everyday"])
def test_compose_is_distinct_deterministic_and_varied(family):
    first = compose.compose(500, family, seed=3)
    assert len(first) == 500 and len(set(first)) == 500
    assert first == compose.compose(500, family, seed=3)
    assert first != compose.compose(500, family, seed=4)
    # Many kinds of request, not one template repeated.
    assert len({" ".join(t.split()[:4]) for t in first}) > 40
    assert all(t == " ".join(t.split()) and t[-1] in '.?"' for t in first)


def test_general_family_still_gives_the_shipped_data_requests():
    """The shipped general adapter's data was composed with `--n 2400 --seed 0` (first 2300 for training, the
    last 100 for tune-tree): new families and templates must not change what that command gives."""
    held = [p for prompts in PROMPT_SETS.values() for p in prompts]
    texts = compose.compose(2400, "general", seed=0, exclude=held)
    data = Path(__file__).parents[2] / "data" / "distill"
    shipped, tune = (
        compose.held_out_prompts(json.loads((data / name).read_text(encoding="utf-8")))
        for name in ("composed-prompts.json", "composed-tune-prompts.json")
    )
    assert texts[:2300] == shipped
    assert texts[2300:] == tune


def test_recipe_requests_are_what_compose_gives():
    """The shipped general adapter's requests (`data/distill/recipe-prompts.json`) are what
    scripts/general-recipe.sh composes: 2500 of each family, seed 0, the tuning prompts excluded."""
    data = Path(__file__).parents[2] / "data" / "distill"
    tune = compose.held_out_prompts(json.loads((data / "composed-tune-prompts.json").read_text("utf-8")))
    held = [p for prompts in PROMPT_SETS.values() for p in prompts] + tune
    recipe = compose.held_out_prompts(json.loads((data / "recipe-prompts.json").read_text("utf-8")))
    assert recipe == compose.compose(2500, "general", 0, held) + compose.compose(2500, "everyday", 0, held)


def test_everyday_family_adds_thousands_of_new_requests():
    """The family exists to give more distinct requests than `general` alone (~2500): 5000 of its own, of
    twenty kinds, hardly any the same as a general request."""
    everyday = compose.compose(5000, "everyday", seed=0)
    assert len(set(everyday)) == 5000
    assert len({" ".join(t.split()[:3]) for t in everyday}) > 150
    general = set(compose.compose(2500, "general", seed=0))
    assert len(general & set(everyday)) < 25


def test_too_close_is_a_word_set_jaccard():
    held = [compose.words("Write a short story about a lighthouse keeper")]
    assert compose.too_close("write a short story about the lighthouse keeper!", held, 0.5)
    assert not compose.too_close("Give me a recipe for banana bread.", held, 0.5)


def test_excluded_prompts_stay_out():
    # A held-out prompt that is exactly one composable request, and its near variants, are never produced.
    held = ["Give me a recipe for banana bread."]
    texts = compose.compose(2000, seed=0, exclude=held, threshold=0.5)
    assert not any(compose.too_close(t, [compose.words(held[0])], 0.5) for t in texts)
    assert "Give me a recipe for pancakes." in compose.compose(2000, seed=0)  # the template itself works


@pytest.mark.parametrize("family", ["general", "code", "everyday"])
def test_main_writes_distill_input_without_benchmark_prompts(tmp_path, monkeypatch, family):
    out = tmp_path / "prompts.json"
    extra = tmp_path / "held.json"
    extra.write_text(json.dumps(["How does a solar panel work?"]))
    argv = ["compose", str(out), "--n", "300", "--seed", "1", "--exclude", str(extra)]
    argv += ["--family", family]
    monkeypatch.setattr(sys, "argv", argv)
    compose.main()
    dataset = load_conversations(out)
    texts = [c.messages[0]["content"] for c in dataset.conversations]
    assert len(texts) == 300 and not dataset.invalid
    held = [compose.words(p) for prompts in PROMPT_SETS.values() for p in prompts]
    held.append(compose.words("How does a solar panel work?"))
    assert not any(compose.too_close(t, held, 0.5) for t in texts)


def test_an_earlier_output_can_be_excluded(tmp_path, monkeypatch):
    """A second batch of requests keeps clear of the first: compose's own output (conversations) is a valid
    --exclude file, as is a plain list of prompts."""
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    monkeypatch.setattr(sys, "argv", ["compose", str(first), "--n", "200", "--seed", "0"])
    compose.main()
    argv = ["compose", str(second), "--n", "200", "--seed", "1", "--exclude", str(first)]
    monkeypatch.setattr(sys, "argv", argv)
    compose.main()
    earlier = [compose.words(c[0]["content"]) for c in json.loads(first.read_text())]
    later = [c[0]["content"] for c in json.loads(second.read_text())]
    assert len(later) == 200 and not any(compose.too_close(t, earlier, 0.5) for t in later)
    assert compose.held_out_prompts(
        ["a", [{"role": "system", "content": "s"}, {"role": "user", "content": "b"}]]
    ) == [
        "a",
        "b",
    ]


def test_follow_ups_add_a_fitting_second_turn_and_leave_first_turns_alone():
    texts = compose.compose(400, seed=0)
    none = compose.conversations(texts, 0.0)
    assert none == [[{"role": "user", "content": t}] for t in texts]
    convs = compose.conversations(texts, 0.5, seed=0)
    assert [c[0]["content"] for c in convs] == texts
    assert convs == compose.conversations(texts, 0.5, seed=0)
    two = [c for c in convs if len(c) == 2]
    assert 150 < len(two) < 250 and all(c[1]["role"] == "user" for c in two)
    assert all(len(c) == 2 for c in compose.conversations(texts, 1.0))
    rng = random.Random(0)
    assert compose.follow_up("Write a limerick about the moon.", rng) in compose.CREATIVE_FOLLOW_UPS
    code = compose.follow_up("Write a Python function that sorts a list.", rng)
    assert code in compose.CODE_FOLLOW_UPS + compose.FOLLOW_UPS
    assert compose.follow_up("How does a compass work?", rng) in compose.FOLLOW_UPS
    # A second turn too close to a held-out prompt is left out.
    held = list(compose.FOLLOW_UPS) + list(compose.CREATIVE_FOLLOW_UPS) + list(compose.CODE_FOLLOW_UPS)
    assert all(len(c) == 1 for c in compose.conversations(texts, 1.0, exclude=held))


def test_main_follow_ups_are_replayable_conversations(tmp_path, monkeypatch):
    out = tmp_path / "p.json"
    argv = ["compose", str(out), "--n", "50", "--follow-ups", "1"]
    monkeypatch.setattr(sys, "argv", argv)
    compose.main()
    dataset = load_conversations(out)
    assert len(dataset.conversations) == 50 and not dataset.invalid
    assert all([m["role"] for m in c.messages] == ["user", "user"] for c in dataset.conversations)
