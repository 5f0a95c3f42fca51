"""Advantages: pure functions from rewards and segment scores to per-token advantages.

GRPO's sequence advantage is group-relative without std division (Dr.GRPO). E³RL adds, each
behind its own switch: segment-level allocation of a sample's advantage by how uncertain
each segment was (SPO/TreePO-style credit), the pair rule on erasure events (the erased
attempt against its replacement, with or without a reward), and fork advantages (a branch
point at an uncertain segment whose branches are all finished and graded: each branch's
tokens after the fork are judged against the fork's own mean reward, as TreeRL and VinePPO
estimate values from intermediate states).
"""

from __future__ import annotations

import math

import torch


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``A = R - mean_G(R)`` per group (no std division).

    rewards: [num_groups, group_size] -> advantages [num_groups, group_size]."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def informative_groups(rewards: torch.Tensor) -> torch.Tensor:
    """Groups whose rewards are not all equal (the only ones with a GRPO signal).

    rewards: [num_groups, group_size] -> bool [num_groups]."""
    return (rewards != rewards[:, :1]).any(dim=1)


def segment_spans(token_ids: list[int], boundary_ids: frozenset[int] | set[int],
                  min_tokens: int = 2, max_tokens: int = 64) -> list[tuple[int, int]]:
    """Segments ``[start, end)`` of an output, as the engine's healer cuts them: a segment
    closes after a boundary token once it has ``min_tokens`` tokens, or at ``max_tokens``;
    the rest of the output is the last segment. Spans tile the whole output."""
    spans, start = [], 0
    for i, token in enumerate(token_ids):
        length = i + 1 - start
        if (token in boundary_ids and length >= min_tokens) or length >= max_tokens:
            spans.append((start, i + 1))
            start = i + 1
    if start < len(token_ids):
        spans.append((start, len(token_ids)))
    return spans


def segment_weights(scores: torch.Tensor, lengths: torch.Tensor, alpha: float = 0.5,
                    low: float = 0.5, high: float = 2.0) -> torch.Tensor:
    """Per-segment weights of one sample: ``z_k = (S_k - mu)/sigma`` over its segments,
    ``w_k = clip(1 + alpha*max(z_k, 0), low, high)``, renormalised so that the token-mean
    weight is 1 (``sum_k n_k w_k = sum_k n_k``): the sample's total advantage is unchanged,
    only moved towards its uncertain segments.

    scores: [K] segment scores; lengths: [K] tokens per segment -> weights [K].
    One segment, or segments with equal scores, get weight 1."""
    scores = scores.double()
    lengths = lengths.double()
    if scores.numel() < 2:
        return torch.ones_like(scores, dtype=torch.float32)
    sigma = scores.std(unbiased=False)
    if sigma <= 1e-12:
        return torch.ones_like(scores, dtype=torch.float32)
    z = (scores - scores.mean()) / sigma
    w = (1 + alpha * z.clamp(min=0)).clamp(low, high)
    w = w * lengths.sum() / (w * lengths).sum()
    return w.float()


def pair_advantages(reward: float, advantage: float, delta: float = 0.5) -> tuple[float, float]:
    """The pair rule with a reward, for one erasure event of a sample with reward ``reward``
    and sequence advantage ``advantage``: if the sample ended right, its replacement segment
    gets ``+delta*|A|`` and the erased attempt ``-delta*|A|``; if it ended wrong, nothing
    (the erased attempt might have been right: no signal about it).

    Returns (replacement bonus, erased attempt's advantage)."""
    if reward > 0:
        d = delta * abs(advantage)
        return d, -d
    return 0.0, 0.0


def reward_free_pair_advantages(score_gaps: torch.Tensor) -> torch.Tensor:
    """The pair rule without a reward (served traffic): ``D = S(erased) - S(replacement)``,
    the replacement gets ``+tanh(D/sigma_D)`` and the erased attempt the negative, only for
    pairs with ``|D| > 0.5*sigma_D`` (sigma_D over the given pairs); others get 0.

    score_gaps: [num_pairs] -> replacement advantages [num_pairs] (erased: the negative).
    With fewer than two pairs sigma_D is undefined and every advantage is 0."""
    if score_gaps.numel() < 2:
        return torch.zeros_like(score_gaps)
    sigma = score_gaps.double().std(unbiased=False).item()
    if sigma <= 1e-12:
        return torch.zeros_like(score_gaps)
    value = torch.tanh(score_gaps / sigma)
    return torch.where(score_gaps.abs() > 0.5 * sigma, value, torch.zeros_like(value))


def fork_advantages(branch_rewards: torch.Tensor) -> torch.Tensor:
    """Local advantages at a fork point: ``R_b - mean(R)`` over all branches from the same
    prefix (the parent's own continuation included). Applied to each branch's tokens after
    the fork; the parent's tokens before it keep the group advantage.

    branch_rewards: [num_branches] -> [num_branches]."""
    return branch_rewards - branch_rewards.mean()


def uncertain_threshold(scores: list[float], quantile: float) -> float:
    """The ``quantile`` of a step's segment scores (linear interpolation); inf when empty.
    The fork rule uses it so that "uncertain" follows the policy as it sharpens."""
    if not scores:
        return math.inf
    return torch.quantile(torch.tensor(scores, dtype=torch.float64), quantile).item()
