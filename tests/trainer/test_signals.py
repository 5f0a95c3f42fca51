"""Learning signals from served traffic: which records are used, and the rows they give
(hand-computed values)."""

from __future__ import annotations

import math

import pytest

from e3rl.trainer.config import FollowConfig
from e3rl.trainer.signals import build_rows, classify, feedback_reward

VERSIONS = {"0": 0, "1": 1, "2": 2, "3": 3}


def config(**overrides) -> FollowConfig:
    return FollowConfig(**{"servers": ["http://127.0.0.1:1"], "model": "m", "state_dir": "s",
                           "segment_weights": False, **overrides})


def record(rid="cmpl-a-0:0", request_id="cmpl-a-0", n=1, output=(5, 6, 7, 8), version="3",
           feedback=None, erasures=(), temperature=1.0, finish="stop", **extra) -> dict:
    out = list(output)
    return {"id": rid, "request_id": request_id, "index": int(rid.rsplit(":", 1)[1]), "n": n,
            "prompt": "Q: 1+2\nA:\n", "prompt_token_ids": [1, 2, 3], "output_token_ids": out,
            "text": "1+2=3\nanswer: 3", "nll": [0.1 * (i + 1) for i in range(len(out))],
            "weight_version": version, "weight_versions": [[0, version]],
            "segments": [], "erasures": list(erasures), "finish_reason": finish,
            "sampling_params": {"temperature": temperature, "top_p": 1.0, "top_k": 0,
                                "min_p": 0.0},
            "feedback": feedback, **extra}


def event(position=1, erased=(9, 9), replacement=(6, 7), score=0.9, replacement_score=0.1):
    return {"position": position, "erased_token_ids": list(erased),
            "erased_nll": [0.5] * len(erased), "score": score,
            "replacement_token_ids": list(replacement), "replacement_score": replacement_score}


@pytest.mark.parametrize("changes,reason", [
    ({"temperature": 0.0}, "greedy"),
    ({"temperature": 0.7}, "sampling_mismatch"),
    ({"finish": "abort"}, "unfinished"),
    ({"version": "0"}, "stale"),  # 3 updates behind, bound 2
    ({"version": "unknown"}, "stale"),
    ({}, "no_signal"),
])
def test_records_that_are_not_used_say_why(changes, reason):
    assert classify(record(**changes), config(), VERSIONS, current=3) == reason


def test_malformed_record():
    bad = record()
    bad["nll"] = bad["nll"][:-1]
    assert classify(bad, config(), VERSIONS, 3) == "malformed"
    assert classify({"id": "x"}, config(), VERSIONS, 3) == "malformed"


def test_rewards_come_from_feedback_or_a_graded_reference():
    used = classify(record(feedback={"reward": 0.5}), config(), VERSIONS, 3)
    assert used.signal == "reward" and used.reward == 0.5
    assert feedback_reward(record(feedback={"reference": "3", "reward": None})) == 1.0
    assert feedback_reward(record(feedback={"reference": "4", "reward": None})) == 0.0
    # reward-free only when allowed; rewards only when allowed
    pair = record(erasures=[event()])
    assert classify(pair, config(), VERSIONS, 3).signal == "reward-free"
    assert classify(pair, config(signals="rewards"), VERSIONS, 3) == "no_signal"
    assert classify(record(feedback={"reward": 1.0}), config(signals="reward-free"),
                    VERSIONS, 3) == "no_signal"


def test_single_samples_are_centred_on_the_running_mean():
    c = config(baseline_momentum=0.5)
    batch = [classify(record(rid=f"r{i}-0:0", request_id=f"r{i}-0", feedback={"reward": r}),
                      c, VERSIONS, 3) for i, r in enumerate([1.0, 0.0, 1.0, 1.0])]
    rows, stats, baseline = build_rows(batch, c, None, VERSIONS, 3)
    # first batch: centred on its own mean 0.75, which becomes the baseline
    assert [row.advantages[0] for row in rows] == pytest.approx([0.25, -0.75, 0.25, 0.25])
    assert baseline == pytest.approx(0.75)
    rows, _, baseline = build_rows(batch, c, 0.5, VERSIONS, 3)
    assert [row.advantages[0] for row in rows] == pytest.approx([0.5, -0.5, 0.5, 0.5])
    assert baseline == pytest.approx(0.5 * 0.5 + 0.5 * 0.75)
    row = rows[0]
    assert row.prompt_ids == [1, 2, 3] and row.output_ids == [5, 6, 7, 8]
    assert row.old_logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert row.mask == [1, 1, 1, 1] and stats.rewards == [1.0, 0.0, 1.0, 1.0]


def test_samples_of_one_request_are_a_group():
    c = config()
    batch = [classify(record(rid=f"g-0:{j}", request_id="g-0", n=3, feedback={"reward": r}),
                      c, VERSIONS, 3) for j, r in enumerate([1.0, 0.0, 0.0])]
    rows, _, baseline = build_rows(batch, c, 0.9, VERSIONS, 3)
    assert [row.advantages[0] for row in rows] == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    assert baseline == 0.9  # no single sample: the running mean is unchanged


def test_pair_rule_with_a_reward():
    c = config(pair_delta=0.5)
    right = classify(record(feedback={"reward": 1.0}, erasures=[event(position=1)]),
                     c, VERSIONS, 3)
    rows, stats, _ = build_rows([right], c, 0.5, VERSIONS, 3)
    sample, erased = rows
    a, d = 0.5, 0.25  # A = 1 - 0.5, delta = 0.5 * |A|
    assert sample.advantages == pytest.approx([a, a + d, a + d, a])  # replacement = tokens 1, 2
    assert erased.prompt_ids == [1, 2, 3, 5] and erased.output_ids == [9, 9]
    assert erased.advantages == pytest.approx([-d, -d])
    assert erased.old_logprobs == pytest.approx([-0.5, -0.5])
    assert stats.num_pair_rows == 1
    wrong = classify(record(feedback={"reward": 0.0}, erasures=[event()]), c, VERSIONS, 3)
    rows, stats, _ = build_rows([wrong], c, 0.5, VERSIONS, 3)
    assert len(rows) == 1 and rows[0].advantages == pytest.approx([-0.5] * 4)


def test_reward_free_pairs_train_only_the_pair_spans():
    c = config()
    gaps = [0.8, 0.2]  # sigma = 0.3: both pass |D| > 0.15
    batch = [classify(record(rid=f"f{i}-0:0", request_id=f"f{i}-0",
                             erasures=[event(score=0.9, replacement_score=0.9 - g)]),
                      c, VERSIONS, 3) for i, g in enumerate(gaps)]
    rows, stats, _ = build_rows(batch, c, None, VERSIONS, 3)
    sigma = 0.3
    v = [math.tanh(g / sigma) for g in gaps]
    assert stats.num_reward_free_pairs == 2 and len(rows) == 4
    first, first_erased, second, second_erased = rows
    assert first.mask == [0, 1, 1, 0]
    assert first.advantages == pytest.approx([0, v[0], v[0], 0])
    assert first_erased.advantages == pytest.approx([-v[0]] * 2)
    assert second.advantages == pytest.approx([0, v[1], v[1], 0])
    assert second_erased.mask == [1, 1]


def test_stale_tokens_are_masked():
    c = config(max_staleness=1)
    mixed = record(feedback={"reward": 1.0}, version="3", weight_versions=[[0, "1"], [2, "3"]])
    rows, stats, _ = build_rows([classify(mixed, c, VERSIONS, 3)], c, 0.0, VERSIONS, 3)
    assert rows[0].mask == [0, 0, 1, 1] and rows[0].versions == [1, 1, 3, 3]
    assert stats.num_stale_tokens == 2
