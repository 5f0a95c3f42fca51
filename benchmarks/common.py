"""Shared benchmark helpers: the model, the workload, and a check for other CPU load."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from e3rl.engine.model_factory import BENCH_QWEN3_100M, build_random_model

CACHE = Path("/tmp/e3rl-bench")


def bench_model(config: dict | None = None, name: str = "qwen3-100m") -> Path:
    """The ~100M Qwen3-shaped random model (built once, cached under /tmp)."""
    path = CACHE / name
    if not (path / "config.json").exists():
        build_random_model(path, config or BENCH_QWEN3_100M, seed=0)
    return path


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def mixed_workload(num_requests: int = 32, prompt_range=(16, 512), output_range=(16, 256),
                   vocab: int = 32000, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(*prompt_range))]
               for _ in range(num_requests)]
    return Workload(prompts, [rng.randint(*output_range) for _ in range(num_requests)])


class LoadMonitor:
    """CPU used by *other* processes during a run, as a share of all cores. On two cores,
    another busy process can slow torch by up to 100x: results under load are not comparable."""

    def __enter__(self):
        self._me = psutil.Process()
        self._sys0, self._me0, self._t0 = self._busy(), self._me.cpu_times(), time.monotonic()
        return self

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) \
            + getattr(t, "softirq", 0.0)

    def __exit__(self, *exc):
        wall = time.monotonic() - self._t0
        me = self._me.cpu_times()
        mine = (me.user - self._me0.user) + (me.system - self._me0.system) \
            + (me.children_user - self._me0.children_user)
        self.other_share = max(0.0, (self._busy() - self._sys0 - mine)) / (wall * psutil.cpu_count())
        return False

    def note(self) -> str:
        flag = "  WARNING: machine not quiet" if self.other_share > 0.10 else ""
        return f"other load {100 * self.other_share:.0f}%{flag}"
