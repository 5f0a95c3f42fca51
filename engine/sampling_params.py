"""Per-request sampling knobs, shaped like vLLM's ``SamplingParams``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequest

_MAX_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request's completions.

    ``temperature == 0`` is greedy. ``seed`` makes sampling reproducible whatever else is in
    the batch (each sample ``i`` of ``n`` draws from its own generator seeded by ``(seed, i)``).
    ``logprobs`` asks for the top-N log-probs of every sampled token (raw model distribution,
    temperature 1); ``prompt_logprobs`` the same for the prompt tokens. Every sampled token
    also carries its NLL ``-log p`` and the entropy of the distribution it was drawn from
    (after temperature and top-k / top-p / min-p filtering).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Self-healing options (an ``e3rl.engine.healer.HealingParams``), None = off.
    healing: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.healing, dict):
            from .healer.params import HealingParams
            self.healing = HealingParams.from_dict(self.healing)
        if self.top_k == -1:
            self.top_k = 0
        _check(isinstance(self.n, int) and self.n >= 1, "n must be an integer >= 1", "n")
        _check(_is_num(self.temperature) and self.temperature >= 0,
               "temperature must be a number >= 0", "temperature")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]", "top_p")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               "top_k must be an integer >= 0 (or -1 for off)", "top_k")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]", "min_p")
        _check(self.seed is None or isinstance(self.seed, int), "seed must be an integer", "seed")
        # max_tokens 0 scores the prompt only (with prompt_logprobs), as echo requests do.
        min_tokens_allowed = 0 if self.prompt_logprobs is not None else 1
        _check(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool)
               and self.max_tokens >= min_tokens_allowed,
               f"max_tokens must be an integer >= {min_tokens_allowed}", "max_tokens")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
               "min_tokens must be an integer in [0, max_tokens]", "min_tokens")
        _check(all(isinstance(s, str) and s for s in self.stop),
               "stop must be a list of non-empty strings", "stop")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
               "stop_token_ids must be non-negative integers", "stop_token_ids")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and 0 <= value <= _MAX_LOGPROBS),
                   f"{name} must be an integer in [0, {_MAX_LOGPROBS}]", name)

    @property
    def heals(self) -> bool:
        return self.healing is not None and self.healing.enabled

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> SamplingParams:
        """Build from keyword options, rejecting unknown names with a clear message."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if key not in known:
                raise InvalidRequest(f"unknown sampling option {key!r}", param=key)
        return cls(**options)

    def clone(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=param)
