"""The engine-wide part of the adaptive threshold: a high quantile of accepted segments'
scores, per score and temperature. Calibrated offline (``e3rl calibrate`` writes
``e3rl_healing.json`` into the model directory) or estimated online from the scores of the
segments this engine accepted recently."""

from __future__ import annotations

import json
import logging
from collections import deque
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "e3rl_healing.json"


def _temp_key(temperature: float) -> str:
    return f"{round(temperature, 2):.2f}"


class ThresholdEstimator:
    """Quantiles of accepted segment scores, keyed by (score, temperature)."""

    def __init__(self, model_dir: str | Path | None = None, window: int = 4096,
                 min_samples: int = 64):
        self.window = window
        self.min_samples = min_samples
        self._recent: dict[tuple[str, str], deque] = {}
        self._cache: dict[tuple[str, str, float], float] = {}
        self._dirty: dict[tuple[str, str], int] = {}
        self.calibration: dict = {}
        if model_dir is not None and (Path(model_dir) / CALIBRATION_FILE).is_file():
            self.calibration = json.loads((Path(model_dir) / CALIBRATION_FILE).read_text())
            logger.info("healing thresholds calibrated for temperatures %s",
                        sorted(self.calibration.get("thresholds", {})))

    def calibrated(self, score: str, temperature: float, quantile: float) -> float | None:
        """The offline threshold, when the calibration matches score, quantile and
        (within 0.05) the temperature."""
        cal = self.calibration
        if not cal or cal.get("score") != score or abs(cal.get("quantile", -1) - quantile) > 1e-9:
            return None
        table = cal.get("thresholds", {})
        near = [k for k in table if abs(float(k) - temperature) <= 0.05 + 1e-9]
        return float(table[min(near, key=lambda k: abs(float(k) - temperature))]) if near else None

    def observe(self, score_name: str, temperature: float, value: float) -> None:
        key = (score_name, _temp_key(temperature))
        self._recent.setdefault(key, deque(maxlen=self.window)).append(value)
        self._dirty[key] = self._dirty.get(key, 0) + 1

    def quantile(self, score: str, temperature: float, quantile: float) -> float | None:
        value = self.calibrated(score, temperature, quantile)
        if value is not None:
            return value
        key = (score, _temp_key(temperature))
        recent = self._recent.get(key)
        if recent is None or len(recent) < self.min_samples:
            return None  # cold start: no erasures until the estimate exists
        cache_key = (*key, quantile)
        if cache_key not in self._cache or self._dirty.get(key, 0) >= 32:
            self._cache[cache_key] = float(np.quantile(np.fromiter(recent, float), quantile))
            self._dirty[key] = 0
        return self._cache[cache_key]
