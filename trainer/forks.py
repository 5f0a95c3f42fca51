"""Where to fork: E³RL's erasure rule applied to finished samples during training.

The healer erases a segment whose score exceeds a threshold; during training the same
segment becomes a fork point instead: the sample's own continuation is kept, and new branches
are sampled from the segment's start and finished, so that each branch can be judged by its
own reward (TreeRL, VinePPO). The threshold is a quantile of the step's own segment scores,
so it follows the policy as it sharpens (a calibrated threshold would stop firing).
"""

from __future__ import annotations

from .advantages import uncertain_threshold


def choose_forks(segments: list[list[tuple[int, int, float]]], quantile: float,
                 budget: int) -> list[tuple[int, int]]:
    """Fork points ``(episode index, output position)``: for each episode its first segment
    scoring above the step's ``quantile`` (the last segment, the final answer, is never a
    fork point), then the ``budget`` highest-scoring of those, in episode order.

    segments: per episode, ``(start, end, score)`` spans tiling its output."""
    threshold = uncertain_threshold([s for spans in segments for _, _, s in spans[:-1]],
                                    quantile)
    candidates = []
    for i, spans in enumerate(segments):
        for start, _, score in spans[:-1]:
            if score > threshold:
                candidates.append((score, i, start))
                break
    best = sorted(candidates, key=lambda c: (-c[0], c[1]))[:budget]
    return sorted((i, start) for _, i, start in best)
