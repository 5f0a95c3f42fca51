"""Segment uncertainty scores (pure functions). Boundaries are token ids, found once per
boundary set by the engine (``LLMEngine._boundaries``)."""

from __future__ import annotations

import math


def segment_score(name: str, nll: list[float], entropy: list[float], window: int = 4,
                  top_q: float = 0.25) -> float:
    """Uncertainty of one segment from its tokens' NLL and entropy.

    ``mean_nll`` (default: a single forking token does not erase a segment by itself),
    ``max_nll``, ``mean_entropy``, ``top_q_mean`` (mean of the highest quarter of NLLs),
    ``window_mean`` (worst mean NLL over ``window`` consecutive tokens, as DeepConf).
    """
    if not nll:
        return 0.0
    if name == "mean_nll":
        return sum(nll) / len(nll)
    if name == "max_nll":
        return max(nll)
    if name == "mean_entropy":
        return sum(entropy) / len(entropy)
    if name == "top_q_mean":
        k = max(1, math.ceil(top_q * len(nll)))
        return sum(sorted(nll, reverse=True)[:k]) / k
    if name == "window_mean":
        w = min(window, len(nll))
        return max(sum(nll[i:i + w]) / w for i in range(len(nll) - w + 1))
    raise ValueError(f"unknown segment score {name!r}")
