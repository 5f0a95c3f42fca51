"""Self-healing options of one request (defaults from DESIGN.md, tuned on validation data)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidRequest

SCORES = ("mean_nll", "max_nll", "mean_entropy", "top_q_mean", "window_mean")
COMBINES = ("quantile", "sequence", "max", "min")


@dataclass(slots=True)
class HealingParams:
    """When a finished segment's uncertainty ``score`` exceeds the threshold ``tau``, the
    segment is erased and generated again.

    ``tau`` combines an engine-wide ``quantile`` of accepted segments' scores (from the model
    directory's calibration file, else a running estimate; ``threshold`` overrides it with a
    fixed value) and the sequence's own ``mu + kappa * sigma`` (EMA over its accepted
    segments, once it has ``min_segments``): ``combine`` picks ``quantile``, ``sequence``,
    their ``max`` (fewer false alarms) or their ``min`` (more recall).
    """

    enabled: bool = True
    score: str = "mean_nll"
    quantile: float = 0.95
    threshold: float | None = None
    kappa: float = 2.0
    ema_beta: float = 0.8
    min_segments: int = 3
    combine: str = "quantile"
    segment_boundary: list[str] = field(default_factory=lambda: ["\n"])
    min_segment_tokens: int = 2
    max_segment_tokens: int = 64
    max_retries_per_segment: int = 2
    max_erasures: int = 4
    max_erased_fraction: float = 0.25
    max_computed_tokens: int | None = None
    answer_marker: str | None = None
    retry_temperature: float | None = None
    hysteresis: float = 0.0  # added to the quantile per retry of the same segment
    ban_top_nll_token: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.segment_boundary, str):
            self.segment_boundary = [self.segment_boundary]
        _check(self.score in SCORES, f"healing.score must be one of {list(SCORES)}", "score")
        _check(self.combine in COMBINES, f"healing.combine must be one of {list(COMBINES)}",
               "combine")
        _check(0 < self.quantile < 1, "healing.quantile must be in (0, 1)", "quantile")
        _check(self.kappa >= 0, "healing.kappa must be >= 0", "kappa")
        _check(0 <= self.ema_beta < 1, "healing.ema_beta must be in [0, 1)", "ema_beta")
        _check(bool(self.segment_boundary) and all(isinstance(b, str) and b
                                                   for b in self.segment_boundary),
               "healing.segment_boundary must be non-empty strings", "segment_boundary")
        _check(1 <= self.min_segment_tokens <= self.max_segment_tokens,
               "healing.min_segment_tokens must be in [1, max_segment_tokens]",
               "min_segment_tokens")
        for name in ("max_retries_per_segment", "max_erasures", "min_segments"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                   f"healing.{name} must be an integer >= 0", name)
        _check(0 <= self.max_erased_fraction <= 1,
               "healing.max_erased_fraction must be in [0, 1]", "max_erased_fraction")
        _check(self.retry_temperature is None or self.retry_temperature > 0,
               "healing.retry_temperature must be > 0", "retry_temperature")
        _check(self.hysteresis >= 0, "healing.hysteresis must be >= 0", "hysteresis")

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> HealingParams:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            _check(key in known, f"unknown healing option {key!r}", key)
        try:
            return cls(**options)
        except TypeError as exc:
            raise InvalidRequest(f"healing: {exc}", param="healing") from exc


def _check(ok: bool, message: str, name: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=f"healing.{name}")
