"""math-verify grading for LaTeX / boxed answers (DeepMath, AIME)."""

from __future__ import annotations

import threading


def grade_math(completion: str, gold: str) -> bool:
    """``verify(parse(gold), parse(answer))``, gold first. math-verify's timeouts use
    ``signal.alarm``, which only works on the main thread: elsewhere they are turned off."""
    from math_verify import parse, verify

    main = threading.current_thread() is threading.main_thread()
    kwargs = {} if main else {"parsing_timeout": None}
    gold_parsed = parse(_wrap(gold), **kwargs)
    answer_parsed = parse(completion, **kwargs)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, **({} if main else {"timeout_seconds": None})))


def _wrap(gold: str) -> str:
    """Gold answers are bare LaTeX (``\\frac{1}{2}``): give math-verify a math environment."""
    gold = gold.strip()
    return gold if gold.startswith("$") or "\\boxed" in gold else f"${gold}$"
