"""Graders: decide whether a completion's final answer matches the reference answer."""

from __future__ import annotations

import re
from fractions import Fraction

from .arith import ANSWER_MARKER

_ANSWER_LINE_RE = re.compile(rf"^\s*{re.escape(ANSWER_MARKER)}\s*(\S+)\s*$")


def parse_number(text: str) -> Fraction | None:
    """An exact number from ``text`` ("122", "-3", "0.5", "1/2"), or None if it is none."""
    try:
        return Fraction(str(text).strip())
    except (ValueError, ZeroDivisionError):
        return None


def extract_arith_answer(completion: str) -> str | None:
    """The value written on the completion's first final-answer line (``answer: 122``).

    The first one counts: a model may not hedge with several answer lines. Returns None if
    no line starts with the answer marker."""
    for line in completion.splitlines():
        match = _ANSWER_LINE_RE.match(line)
        if match is not None:
            return match.group(1)
    return None


def grade_arith(completion: str, final_answer: str | int) -> bool:
    """Exact numeric match of the completion's final-answer line against ``final_answer``."""
    answer_text = extract_arith_answer(completion)
    if answer_text is None:
        return False
    got, gold = parse_number(answer_text), parse_number(str(final_answer))
    return got is not None and gold is not None and got == gold
