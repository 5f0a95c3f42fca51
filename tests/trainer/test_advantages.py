"""Advantages and fork points against hand-computed values (the expected numbers are written
out, never produced by the function under test)."""

import math
import random

import pytest
import torch

from e3rl.trainer.advantages import (
    fork_advantages,
    group_advantages,
    informative_groups,
    pair_advantages,
    reward_free_pair_advantages,
    segment_spans,
    segment_weights,
    uncertain_threshold,
)
from e3rl.trainer.forks import choose_forks


def _close(actual, expected, tol=1e-6):
    actual = actual.tolist() if isinstance(actual, torch.Tensor) else list(actual)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a == pytest.approx(e, abs=tol), (actual, expected)


# -- group advantages -----------------------------------------------------------------------
def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                            [0.2, 0.6, 1.0, 0.2]], dtype=torch.float64)
    # Row means 0.5 and 0.5; no std division (Dr.GRPO).
    expected = [[0.5, -0.5, -0.5, 0.5],
                [-0.3, 0.1, 0.5, -0.3]]
    out = group_advantages(rewards)
    assert out.shape == (2, 4)
    for row, exp in zip(out, expected):
        _close(row, exp, 1e-12)


def test_group_advantages_not_divided_by_std():
    # mean 1.5; with std division A would be +-1, here it is +-1.5.
    _close(group_advantages(torch.tensor([[3.0, 0.0]]))[0], [1.5, -1.5])


def test_all_equal_groups_give_zero_advantages():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]])
    assert torch.equal(group_advantages(rewards), torch.zeros(3, 4))


def test_informative_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                            [0.0, 1.0, 0.0, 0.0],
                            [0.0, 0.0, 0.0, 0.0],
                            [1.0, 0.0, 0.0, 0.0],  # differs only in the first column
                            [0.5, 0.5, 0.5, 0.5]])
    assert informative_groups(rewards).tolist() == [False, True, False, True, False]


# -- segment spans --------------------------------------------------------------------------
BOUNDARY = frozenset({9})


def test_segment_spans_boundary_min_max_rules():
    tokens = [9, 1, 9, 2, 3, 4, 5, 6, 9, 7]
    # i=0: boundary but only 1 token (< min 2): stays open; i=2: boundary, 3 tokens: (0, 3).
    # i=3..6: no boundary, 4 tokens reach max 4: (3, 7). i=8: boundary, 2 tokens: (7, 9).
    # The rest, one token, is the last segment: (9, 10).
    assert segment_spans(tokens, BOUNDARY, min_tokens=2, max_tokens=4) == [
        (0, 3), (3, 7), (7, 9), (9, 10)]


def test_segment_spans_edge_cases():
    assert segment_spans([], BOUNDARY) == []
    assert segment_spans([5, 9], BOUNDARY, 2, 64) == [(0, 2)]  # boundary at exactly min
    assert segment_spans([9, 9, 9], BOUNDARY, 1, 64) == [(0, 1), (1, 2), (2, 3)]
    assert segment_spans([1, 2, 3, 4, 5], BOUNDARY, 2, 64) == [(0, 5)]  # no boundary
    assert segment_spans([1, 2, 3, 4, 5], BOUNDARY, 2, 2) == [(0, 2), (2, 4), (4, 5)]
    assert segment_spans([1, 9, 2], {9}, 2, 64) == [(0, 2), (2, 3)]  # a plain set works


def test_segment_spans_tile_the_output():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(0, 40)
        tokens = [rng.choice([1, 2, 9, 9, 8]) for _ in range(n)]
        lo = rng.randrange(1, 5)
        hi = rng.randrange(lo, 9)
        spans = segment_spans(tokens, {9, 8}, lo, hi)
        if n == 0:
            assert spans == []
            continue
        assert spans[0][0] == 0 and spans[-1][1] == n
        for (_, b), (c, _) in zip(spans, spans[1:]):
            assert b == c
        for k, (a, b) in enumerate(spans):
            assert 1 <= b - a <= hi
            if k < len(spans) - 1:  # a closed segment: at max, or a boundary past min
                assert b - a == hi or (tokens[b - 1] in {9, 8} and b - a >= lo)
                # and it closed at the first chance
                for t in range(a, b - 1):
                    assert not (tokens[t] in {9, 8} and t + 1 - a >= lo)


# -- segment weights ------------------------------------------------------------------------
def test_segment_weights_hand_values():
    # scores [0.1, 0.1, 0.4]: mu = 0.2, population var = (0.01 + 0.01 + 0.04)/3 = 0.02,
    # sigma = 0.1414214, z = [-0.7071068, -0.7071068, 1.4142136].
    # w = clip(1 + 0.5*max(z, 0), 0.5, 2) = [1, 1, 1.7071068].
    # lengths [4, 4, 2]: sum n = 10, sum n*w = 4 + 4 + 3.4142136 = 11.4142136,
    # factor 10/11.4142136 = 0.8761007 -> w = [0.8761007, 0.8761007, 1.4955974].
    w = segment_weights(torch.tensor([0.1, 0.1, 0.4]), torch.tensor([4, 4, 2]), alpha=0.5)
    assert w.dtype == torch.float32
    _close(w, [0.8761007, 0.8761007, 1.4955974])
    # token-mean exactly 1: 4*0.8761007 + 4*0.8761007 + 2*1.4955974 = 10
    assert (w.double() * torch.tensor([4.0, 4.0, 2.0], dtype=torch.float64)).sum().item() \
        == pytest.approx(10.0, abs=1e-5)


def test_segment_weights_sample_std_would_differ():
    # With the unbiased std (sigma = sqrt(0.03) = 0.1732051) z_3 = 1.1547005 and
    # w_3 = 1.5773503 before renormalisation, factor 10/11.1547005 = 0.8964841:
    # the weights would be [0.8964841, 0.8964841, 1.4140793]. They must not be.
    w = segment_weights(torch.tensor([0.1, 0.1, 0.4]), torch.tensor([4, 4, 2]), alpha=0.5)
    assert abs(w[0].item() - 0.8964841) > 1e-3


def test_segment_weights_token_mean_is_one():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        k = int(torch.randint(2, 9, (1,), generator=gen))
        scores = torch.rand(k, generator=gen) * 3
        lengths = torch.randint(1, 20, (k,), generator=gen)
        w = segment_weights(scores, lengths, alpha=float(torch.rand(1, generator=gen)) * 3)
        total = (w.double() * lengths.double()).sum().item()
        assert total == pytest.approx(lengths.sum().item(), rel=1e-6)
        # the most uncertain segment never gets less than the least uncertain one
        assert w[scores.argmax()] >= w[scores.argmin()]


def test_segment_weights_equal_scores_and_single_segment_give_ones():
    assert segment_weights(torch.tensor([0.3, 0.3, 0.3]), torch.tensor([1, 5, 2])).tolist() \
        == [1.0, 1.0, 1.0]
    assert segment_weights(torch.tensor([2.5]), torch.tensor([7])).tolist() == [1.0]


def test_segment_weights_clip_bounds():
    # scores [0, 0, 0, 10]: mu = 2.5, sigma = sqrt((3*6.25 + 56.25)/4) = 4.3301270,
    # z_4 = 7.5/4.3301270 = 1.7320508; 1 + 10*1.7320508 = 18.3 is clipped to high = 2;
    # the others (z < 0) stay 1. Lengths all 1: factor 4/5 -> [0.8, 0.8, 0.8, 1.6].
    w = segment_weights(torch.tensor([0.0, 0.0, 0.0, 10.0]), torch.tensor([1, 1, 1, 1]),
                        alpha=10.0)
    _close(w, [0.8, 0.8, 0.8, 1.6])
    # Tighter high = 1.5: [1, 1, 1, 1.5], factor 4/4.5 -> [0.8888889]*3 + [1.3333333].
    w = segment_weights(torch.tensor([0.0, 0.0, 0.0, 10.0]), torch.tensor([1, 1, 1, 1]),
                        alpha=10.0, high=1.5)
    _close(w, [0.8888889, 0.8888889, 0.8888889, 1.3333333])
    # low > 1 lifts the below-mean segments before renormalisation:
    # pre = clip([1, 1, 1, 18.3], 1.2, 2) = [1.2, 1.2, 1.2, 2], factor 4/5.6 = 0.7142857.
    w = segment_weights(torch.tensor([0.0, 0.0, 0.0, 10.0]), torch.tensor([1, 1, 1, 1]),
                        alpha=10.0, low=1.2)
    _close(w, [0.8571429, 0.8571429, 0.8571429, 1.4285714])


def test_segment_weights_ratio_never_exceeds_high_over_one():
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):
        scores = torch.rand(6, generator=gen) * 5
        w = segment_weights(scores, torch.randint(1, 10, (6,), generator=gen), alpha=50.0)
        assert w.max().item() / w.min().item() <= 2.0 + 1e-5
        assert w.min().item() >= 0.5 - 1e-6 and w.max().item() <= 2.0 + 1e-6


# -- pair rule ------------------------------------------------------------------------------
def test_pair_advantages_with_reward():
    assert pair_advantages(1.0, -0.6, 0.5) == pytest.approx((0.3, -0.3))  # |A| used
    assert pair_advantages(1.0, 0.4, 0.5) == pytest.approx((0.2, -0.2))
    assert pair_advantages(1.0, 0.8, 0.25) == pytest.approx((0.2, -0.2))
    assert pair_advantages(0.0, -0.6, 0.5) == (0.0, 0.0)  # ended wrong: no signal
    assert pair_advantages(0.0, 0.7, 0.5) == (0.0, 0.0)


def test_reward_free_pair_advantages_hand_values():
    # D = [2, -2, 0.5, -0.5]: mean 0, sigma = sqrt((4 + 4 + 0.25 + 0.25)/4) = 1.4577380,
    # cut 0.5*sigma = 0.7288690: |0.5| is below it -> 0.
    # tanh(2/1.4577380) = tanh(1.3719887) = 0.8791446.
    out = reward_free_pair_advantages(torch.tensor([2.0, -2.0, 0.5, -0.5]))
    _close(out, [0.8791446, -0.8791446, 0.0, 0.0])
    # D = [1, -1]: sigma = 1, tanh(1) = 0.7615942.
    _close(reward_free_pair_advantages(torch.tensor([1.0, -1.0])), [0.7615942, -0.7615942])


def test_reward_free_pair_advantages_degenerate():
    assert reward_free_pair_advantages(torch.tensor([3.0])).tolist() == [0.0]
    assert reward_free_pair_advantages(torch.tensor([])).tolist() == []
    assert reward_free_pair_advantages(torch.tensor([0.4, 0.4, 0.4])).tolist() == [0.0] * 3


# -- forks ----------------------------------------------------------------------------------
def test_fork_advantages_hand_values():
    _close(fork_advantages(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)),
           [-2 / 3, 1 / 3, 1 / 3], 1e-12)
    _close(fork_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0])), [0.75, -0.25, -0.25, -0.25])
    assert fork_advantages(torch.tensor([1.0, 1.0, 1.0])).tolist() == [0.0, 0.0, 0.0]


def test_uncertain_threshold():
    assert uncertain_threshold([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    # sorted [1..5], position 0.9*4 = 3.6 -> 4 + 0.6*(5 - 4) = 4.6
    assert uncertain_threshold([5.0, 1.0, 2.0, 3.0, 4.0], 0.9) == pytest.approx(4.6)
    assert uncertain_threshold([7.0], 0.3) == 7.0
    assert uncertain_threshold([], 0.9) == math.inf


SEGMENTS = [
    [(0, 3, 0.1), (3, 6, 0.9), (6, 8, 5.0)],  # the last segment (5.0) is never a fork
    [(0, 2, 0.85), (2, 5, 0.95), (5, 7, 0.0)],
    [(0, 4, 0.2), (4, 6, 0.3)],
    [(0, 3, 9.0)],  # only a last segment
]


def test_choose_forks_first_over_threshold_per_episode():
    # Non-last scores [0.1, 0.9, 0.85, 0.95, 0.2]; the 0.25-quantile: sorted
    # [0.1, 0.2, 0.85, 0.9, 0.95], position 1 -> 0.2. Strictly above it: episode 0's
    # (3, 0.9); episode 1's FIRST one (0, 0.85), not its higher (2, 0.95); episode 2's 0.2
    # is not above; episode 3 has no candidate.
    assert choose_forks(SEGMENTS, 0.25, budget=10) == [(0, 3), (1, 0)]
    # budget 1 keeps the highest candidate score: 0.9 (episode 0) over 0.85.
    assert choose_forks(SEGMENTS, 0.25, budget=1) == [(0, 3)]


def test_choose_forks_budget_keeps_highest_in_episode_order():
    # median of [0.1, 0.2, 0.85, 0.9, 0.95] = 0.85: candidates (0, 3, 0.9), (1, 2, 0.95).
    assert choose_forks(SEGMENTS, 0.5, budget=1) == [(1, 2)]
    assert choose_forks(SEGMENTS, 0.5, budget=2) == [(0, 3), (1, 2)]  # episode order
    segments = [[(0, 2, 0.1), (2, 4, 0.2)], [(0, 2, 3.0), (2, 4, 0.0)],
                [(0, 2, 2.0), (2, 4, 0.0)], [(0, 2, 4.0), (2, 4, 0.0)]]
    # non-last [0.1, 3, 2, 4], 0.1-quantile: position 0.3 -> 0.1 + 0.3*1.9 = 0.67.
    # Candidates: 1 (3.0), 2 (2.0), 3 (4.0); budget 2 -> 4.0 and 3.0, episode order.
    assert choose_forks(segments, 0.1, budget=2) == [(1, 0), (3, 0)]


def test_choose_forks_never_the_last_segment():
    assert choose_forks([[(0, 5, 100.0)], [(0, 2, 0.0)]], 0.1, budget=5) == []
    assert choose_forks([], 0.5, budget=3) == []
    # last segments do not enter the threshold either: non-last scores [1, 2] -> median 1.5
    # (with the last ones, [1, 2, 100, 100] -> 51, and nothing would fork).
    segments = [[(0, 2, 1.0), (2, 4, 100.0)], [(0, 2, 2.0), (2, 4, 100.0)]]
    assert choose_forks(segments, 0.5, budget=5) == [(1, 0)]
