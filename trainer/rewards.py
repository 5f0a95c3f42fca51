"""Rewards: one signature for every grader, ``reward(problem, completion) -> float``.

Arith-chain is graded by exact number, everything else with math-verify. math-verify's own
timeouts use ``signal.alarm`` (main thread only); off the main thread they are turned off
(`e3rl.trainer.math_grading`), so a batch is graded on a thread pool safely.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .datasets import Problem
from .grading import grade_arith
from .math_grading import grade_math


def reward(problem: Problem, completion: str) -> float:
    """1.0 if the completion's final answer matches the problem's, else 0.0."""
    if problem.task == "arith":
        return float(grade_arith(completion, problem.answer))
    return float(grade_math(completion, problem.answer))


def batch_rewards(problems: list[Problem], completions: list[str],
                  num_workers: int = 4) -> list[float]:
    """Rewards of ``completions[i]`` against ``problems[i]``; math problems are graded on a
    thread pool (math-verify can take a while on long answers), arith ones inline."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems for {len(completions)} completions")
    if all(p.task == "arith" for p in problems) or num_workers <= 1:
        return [reward(p, c) for p, c in zip(problems, completions)]
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="reward") as pool:
        return list(pool.map(reward, problems, completions))
