"""The exact-numeric grader of arith-chain completions."""

from __future__ import annotations

import pytest

from e3rl.trainer.grading import extract_arith_answer, grade_arith

GOOD = "47+38=85\n85-19=66\n66+56=122\nanswer: 122"


@pytest.mark.parametrize("completion, gold", [
    (GOOD, "122"), (GOOD, 122), (GOOD + "\n", "122"), ("answer:122", "122"),
    ("  answer: 122  ", "122"), ("answer: 122.0", "122"), ("5-9=-4\nanswer: -4", "-4"),
    ("answer: 122\nanswer: 7", "122"),  # the first answer line counts
])
def test_accepts(completion, gold):
    assert grade_arith(completion, gold)


@pytest.mark.parametrize("completion, gold", [
    (GOOD, "121"), ("47+38=85\n85-19=66\n66+56=122", "122"),  # no answer line
    ("answer: 7\nanswer: 122", "122"), ("answer: 12 2", "122"), ("answer: abc", "122"),
    ("the answer: 122", "122"), ("", "122"), (GOOD, "not a number"), ("answer: -122", "122"),
])
def test_rejects(completion, gold):
    assert not grade_arith(completion, gold)


def test_extract():
    assert extract_arith_answer(GOOD) == "122"
    assert extract_arith_answer("no answer here") is None
