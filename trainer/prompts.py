"""Training prompts: an endless, reproducible stream whose position can be saved and restored.

``arith-chain`` draws from the task's train split (the problem stream of `iter_problems`);
a file (JSONL or Parquet in DeepMath-103K's layout) is shuffled by the seed, epoch by epoch.
The stream's state is one integer, ``position`` (prompts drawn so far), so a resumed run
draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from .arith import TASK_NAME, ArithConfig, format_prompt, iter_problems
from .datasets import DataError, Problem, load_problems


class PromptStream:
    """``take(n)`` returns the next ``n`` problems; ``position`` counts problems taken."""

    def __init__(self, dataset: str, seed: int, position: int = 0,
                 arith_config: ArithConfig | None = None, template: str = "{question}"):
        self.dataset = dataset
        self.seed = seed
        self.arith_config = arith_config
        if dataset == TASK_NAME:
            self._pool = None
        else:
            self._pool = apply_template(load_problems(dataset), template)
            if not self._pool:
                raise DataError(f"{dataset}: no problems")
        self._iter = self._problems()
        self.position = 0
        self.take(position)

    def _problems(self) -> Iterator[Problem]:
        if self._pool is None:
            for p in iter_problems("train", self.seed, self.arith_config):
                yield Problem(p.question, str(p.answer), format_prompt(p.question), "arith")
            return
        epoch = 0
        while True:
            order = list(range(len(self._pool)))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            for i in order:
                yield self._pool[i]
            epoch += 1

    def take(self, n: int) -> list[Problem]:
        out = [next(self._iter) for _ in range(n)]
        self.position += n
        return out


def apply_template(problems: list[Problem], template: str) -> list[Problem]:
    """``template`` (with ``{question}``) applied to the prompts of non-arith problems."""
    if template == "{question}":
        return problems
    return [p if p.task == "arith" else
            Problem(p.question, p.answer, template.replace("{question}", p.question), p.task)
            for p in problems]
