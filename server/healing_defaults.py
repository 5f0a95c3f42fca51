"""Which self-healing defaults the server applies to requests that do not say, and why.

One decision, made once at startup from two inputs, in this order:

1. ``--healing JSON`` (or ``E3RL_HEALING``) from the operator: applied to every request as
   given. Healing is on by default only if it says ``"enabled": true``; any other object (even
   ``{"kappa": 2}``) leaves it off by default and only sets the options of requests that turn
   it on. ``'{"enabled": false}'`` turns the calibrated default below off.
2. Else the model directory's calibration (``e3rl_healing.json``, written by ``e3rl
   calibrate``): *sampled* requests (temperature > 0) heal by default, with the calibrated
   score and quantile so that the calibrated thresholds are the ones used. Greedy requests are
   left alone: a greedy retry would regenerate the same segment, and the measured gains are
   for sampling.
3. Else healing is off by default.

A request's own ``healing`` object always wins, both ways (``{"enabled": false}`` on a
sampled request, ``{"enabled": true}`` on a greedy one).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from e3rl.engine.healer import CALIBRATION_FILE, HealingParams

logger = logging.getLogger(__name__)

Source = Literal["calibration", "--healing", "none"]
SAMPLED_REQUESTS = "sampled requests (temperature > 0)"
ALL_REQUESTS = "all requests"


@dataclass(frozen=True, slots=True)
class HealingDefaults:
    """The healing options every request starts from (its own ``healing`` object is merged
    over them), where they came from, and whether they skip greedy requests."""

    options: dict[str, Any] = field(default_factory=dict)
    source: Source = "none"
    sampled_only: bool = False

    @property
    def is_on(self) -> bool:
        """Whether a request that says nothing about healing heals (if sampled, when
        ``sampled_only``)."""
        return bool(self.options.get("enabled", False))

    @property
    def applies_to(self) -> str:
        return SAMPLED_REQUESTS if self.sampled_only and self.is_on else ALL_REQUESTS

    def options_for(self, temperature: float) -> dict[str, Any]:
        """The defaults of a request sampled at ``temperature``: off for a greedy one when the
        default is for sampled requests only (its other options stay, for a greedy request
        that turns healing on itself)."""
        if self.sampled_only and temperature == 0:
            return {**self.options, "enabled": False}
        return self.options

    def describe(self) -> dict[str, str]:
        """What ``/v1/models`` reports: ``default`` on/off, ``source``, ``applies_to``."""
        return {"default": "on" if self.is_on else "off", "source": self.source,
                "applies_to": self.applies_to}


def resolve(healing: dict[str, Any] | None, model_dir: Path) -> HealingDefaults:
    """The defaults in force: the operator's ``--healing`` (None when not given), else the
    model's calibration, else off (see the module docstring)."""
    if healing is not None:
        return HealingDefaults(dict(healing), "--healing")
    calibration = read_calibration(model_dir)
    if calibration is None:
        return HealingDefaults()
    options = {"enabled": True, "score": calibration["score"],
               "quantile": calibration["quantile"]}
    return HealingDefaults(options, "calibration", sampled_only=True)


def read_calibration(model_dir: Path) -> dict[str, Any] | None:
    """The model directory's healing calibration, or None when there is none. A file that
    cannot be used (bad JSON, unknown score, no thresholds) is logged and ignored: it must not
    turn healing on with thresholds the engine will not find."""
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        calibration = json.loads(path.read_text())
        if not isinstance(calibration, dict) or not calibration.get("thresholds"):
            raise ValueError("no thresholds")
        HealingParams.from_dict({"score": calibration.get("score"),
                                 "quantile": calibration.get("quantile")})
    except (OSError, ValueError, TypeError) as exc:  # InvalidRequest is a ValueError
        logger.warning("ignoring %s: %s (healing stays off by default)", path, exc)
        return None
    return calibration
