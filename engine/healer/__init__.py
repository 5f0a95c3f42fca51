"""Self-healing decoding: segment, score, and erase-and-regenerate uncertain segments."""

from .params import HealingParams
from .policy import Attempt, HealDecision, Healer
from .threshold import CALIBRATION_FILE, ThresholdEstimator

__all__ = ["HealingParams", "Healer", "HealDecision", "Attempt", "ThresholdEstimator",
           "CALIBRATION_FILE"]
