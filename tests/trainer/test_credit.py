"""Credit assignment on hand-built episodes, the collate layout, and RLConfig's checks."""

import pytest
import torch

from e3rl.engine import ErasureEvent
from e3rl.trainer.actor import collate
from e3rl.trainer.config import E3RL_DEFAULTS, RLConfig
from e3rl.trainer.credit import TrainRow, assign_credit
from e3rl.trainer.datasets import Problem
from e3rl.trainer.rollout import Episode

BOUNDARY = frozenset({9})
PROMPT = [100, 101]
PROBLEM = Problem("1+1", "2", "1+1=", "arith")


def episode(output_ids, nll, reward, *, versions=None, prompt=PROMPT, erasures=(),
            index=0, fork_position=0):
    n = len(output_ids)
    return Episode(PROBLEM, 0, index, list(prompt), list(output_ids), [-x for x in nll],
                   [0.0] * n, "", "stop", list(versions or [3] * n), len(prompt) + n,
                   list(erasures), float(reward), fork_position)


def flat(output_ids, reward, **kw):
    return episode(output_ids, [0.5] * len(output_ids), reward, **kw)


def config(**kw):
    return RLConfig(model="x", output_dir="y", **kw)


def e3rl(**kw):
    switches = dict(heal_rollouts=False, segment_weights=False, erasure_learning="off")
    return config(algo="e3rl", **{**switches, **kw})


def row_for(rows, output_ids, prompt=PROMPT):
    found = [r for r in rows if r.output_ids == output_ids and r.prompt_ids == prompt]
    assert len(found) == 1, found
    return found[0]


# -- GRPO -----------------------------------------------------------------------------------
def test_grpo_rows_carry_constant_group_advantage():
    outs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    g0 = [flat(o, r, index=j) for j, (o, r) in enumerate(zip(outs, [1, 0, 0, 1]))]
    g1 = [flat([o + 20 for o in out], r, index=j)
          for j, (out, r) in enumerate(zip(outs, [1, 1, 1, 0]))]
    rows, stats = assign_credit([g0, g1], {}, config(), BOUNDARY, current_version=3)
    # means 0.5 and 0.75
    expected = [0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75]
    assert len(rows) == stats.num_rows == 8
    for row, ep, a in zip(rows, g0 + g1, expected):
        assert row.advantages == pytest.approx([a] * len(ep.output_ids))
        assert row.prompt_ids == PROMPT and row.output_ids == ep.output_ids
        assert row.old_logprobs == ep.logprobs and row.versions == ep.versions
        assert row.mask == [1] * len(ep.output_ids)
    assert stats.num_stale_tokens == stats.num_pair_rows == stats.num_branch_rows == 0


# -- segment weights ------------------------------------------------------------------------
# Segments (boundary 9, min 2): (0, 4), (4, 8), (8, 10), lengths [4, 4, 2], mean NLLs
# [0.1, 0.1, 0.4]. Weights (see test_advantages): [0.8761007, 0.8761007, 1.4955974].
SEG_OUT = [1, 2, 3, 9, 4, 5, 6, 9, 7, 8]
SEG_NLL = [0.1] * 8 + [0.4] * 2
W_LOW, W_HIGH = 0.8761007, 1.4955974


def _segment_group():
    return [[episode(SEG_OUT, SEG_NLL, 0.0, index=0),
             episode([o + 20 if o != 9 else 9 for o in SEG_OUT], SEG_NLL, 1.0, index=1)]]


def test_segment_weights_move_advantage_to_uncertain_segment():
    rows, stats = assign_credit(_segment_group(), {}, e3rl(segment_weights=True), BOUNDARY, 3)
    # A = -0.5 and +0.5
    neg, pos = rows
    assert neg.advantages == pytest.approx([-0.5 * W_LOW] * 8 + [-0.5 * W_HIGH] * 2, abs=1e-6)
    assert pos.advantages == pytest.approx([0.5 * W_LOW] * 8 + [0.5 * W_HIGH] * 2, abs=1e-6)
    # token-mean preserved: the mean over a sample's tokens is its A
    assert sum(neg.advantages) / 10 == pytest.approx(-0.5, abs=1e-6)
    assert sum(pos.advantages) / 10 == pytest.approx(0.5, abs=1e-6)
    assert abs(neg.advantages[9]) > abs(neg.advantages[0])
    assert stats.segment_weight_max == pytest.approx(W_HIGH, abs=1e-6)


def test_segment_weight_mode_negative_leaves_positive_samples_flat():
    rows, _ = assign_credit(_segment_group(), {},
                            e3rl(segment_weights=True, segment_weight_mode="negative"),
                            BOUNDARY, 3)
    neg, pos = rows
    assert neg.advantages == pytest.approx([-0.5 * W_LOW] * 8 + [-0.5 * W_HIGH] * 2, abs=1e-6)
    assert pos.advantages == [0.5] * 10


def test_segment_weights_use_healing_segment_lengths():
    # max_segment_tokens 3 from the healing options cuts (0, 3), (3, 6), (6, 8), (8, 10),
    # lengths [3, 3, 2, 2], mean NLLs [0.1, 0.1, 0.1, 0.4]:
    # mu = 0.175, sigma = sqrt((3*0.075^2 + 0.225^2)/4) = 0.1299038, z_4 = 1.7320508,
    # w = [1, 1, 1, 1.8660254]; sum n w = 8 + 3.7320508 = 11.7320508, factor 0.8523659,
    # w = [0.8523659]*3 + [1.5905364].
    cfg = e3rl(segment_weights=True, healing='{"max_segment_tokens": 3}')
    neg, _ = assign_credit(_segment_group(), {}, cfg, BOUNDARY, 3)[0]
    assert neg.advantages == pytest.approx([-0.5 * 0.8523659] * 8 + [-0.5 * 1.5905364] * 2,
                                           abs=1e-6)


def test_segment_weights_off_in_grpo():
    rows, _ = assign_credit(_segment_group(), {}, config(), BOUNDARY, 3)
    assert rows[0].advantages == [-0.5] * 10 and rows[1].advantages == [0.5] * 10


# -- fork -----------------------------------------------------------------------------------
def test_fork_local_advantages():
    parent = flat([1, 2, 9, 3, 4, 9, 5], 0.0, index=0)
    group = [parent, flat([11], 1.0, index=1), flat([12], 0.0, index=2),
             flat([13], 0.0, index=3)]
    # group mean 0.25: A_parent = -0.25. Fork at output position 3, two branches, both right:
    # family rewards [0, 1, 1], mean 2/3 -> parent -2/3, branches +1/3 each.
    fork_prompt = PROMPT + [1, 2, 9]
    branches = [episode([30, 31, 9], [0.2] * 3, 1.0, prompt=fork_prompt, fork_position=3,
                        index=0),
                episode([40, 41], [0.2] * 2, 1.0, prompt=fork_prompt, fork_position=3,
                        index=1)]
    rows, stats = assign_credit([group], {0: branches}, e3rl(erasure_learning="fork"),
                                BOUNDARY, 3)
    assert stats.num_branch_rows == 2 and stats.num_rows == len(rows) == 6
    prow = row_for(rows, parent.output_ids)
    assert prow.advantages == pytest.approx([-0.25] * 3 + [-2 / 3] * 4)
    for b in branches:
        brow = row_for(rows, b.output_ids, fork_prompt)
        assert brow.advantages == pytest.approx([1 / 3] * len(b.output_ids))
        assert brow.old_logprobs == b.logprobs and brow.mask == [1] * len(b.output_ids)
    # the other samples are untouched
    assert row_for(rows, [11]).advantages == pytest.approx([0.75])
    assert row_for(rows, [12]).advantages == pytest.approx([-0.25])


# -- pairs ----------------------------------------------------------------------------------
def _event(position, erased, replacement, score=2.0, replacement_score=0.5):
    return ErasureEvent(position=position, erased_token_ids=list(erased),
                        erased_nll=[1.0, 2.0, 3.0][:len(erased)],
                        erased_entropy=[0.1] * len(erased), score=score, threshold=1.0,
                        attempt=1, replacement_token_ids=list(replacement),
                        replacement_nll=[0.1] * len(replacement),
                        replacement_score=replacement_score)


def test_pairs_with_reward():
    out = [1, 2, 9, 3, 4, 9, 5, 6]
    right = flat(out, 1.0, versions=[3, 3, 3, 4, 4, 4, 4, 4], index=0,
                 erasures=[_event(3, [7, 7, 9], [3, 4, 9])])
    wrong = flat([8, 8, 9, 8], 0.0, index=1, erasures=[_event(1, [6, 6, 9], [8, 9])])
    cfg = e3rl(heal_rollouts=True, erasure_learning="pairs")  # pair_delta 0.5
    rows, stats = assign_credit([[right, wrong]], {}, cfg, BOUNDARY, 4)
    # A = +0.5 / -0.5. R=1: delta = 0.5*|0.5| = 0.25 on the replacement (positions 3..5),
    # and a row for the erased attempt with -0.25. R=0: nothing.
    assert stats.num_pair_rows == 1 and stats.num_rows == len(rows) == 3
    assert row_for(rows, out).advantages == pytest.approx([0.5] * 3 + [0.75] * 3 + [0.5] * 2)
    assert row_for(rows, [8, 8, 9, 8]).advantages == pytest.approx([-0.5] * 4)
    erased = row_for(rows, [7, 7, 9], PROMPT + [1, 2, 9])
    assert erased.advantages == pytest.approx([-0.25] * 3)
    assert erased.old_logprobs == pytest.approx([-1.0, -2.0, -3.0])
    assert erased.versions == [4, 4, 4] and erased.mask == [1, 1, 1]


def test_pairs_negative_advantage_uses_abs():
    # R=1 with A < 0 needs a group mean above 1 (a reward of 2 beside it):
    # A = 1 - 1.5 = -0.5, delta = 0.5*|-0.5| = 0.25 on the replacement (positions 2..3).
    a = flat([1, 2, 9, 3], 1.0, index=0, erasures=[_event(2, [7, 9], [9, 3])])
    b = flat([5], 2.0, index=1)
    rows, _ = assign_credit([[a, b]], {}, e3rl(heal_rollouts=True, erasure_learning="pairs"),
                            BOUNDARY, 3)
    assert row_for(rows, [1, 2, 9, 3]).advantages == pytest.approx([-0.5, -0.5, -0.25, -0.25])
    assert row_for(rows, [7, 9], PROMPT + [1, 2]).advantages == pytest.approx([-0.25, -0.25])


def test_reward_free_pairs():
    # gaps D = score - replacement_score = [1, -1]: sigma 1, tanh(1) = 0.7615942; rewards
    # are ignored (both samples are wrong).
    a = flat([1, 2, 9, 3], 0.0, index=0,
             erasures=[_event(0, [7, 9], [1, 2], score=1.5, replacement_score=0.5)])
    b = flat([4, 5, 9, 6], 0.0, index=1,
             erasures=[_event(2, [8, 9], [9, 6], score=0.5, replacement_score=1.5)])
    cfg = e3rl(heal_rollouts=True, erasure_learning="pairs", reward_free_pairs=True)
    rows, stats = assign_credit([[a, b]], {}, cfg, BOUNDARY, 3)
    t = 0.7615942
    assert stats.num_pair_rows == 2
    assert row_for(rows, [1, 2, 9, 3]).advantages == pytest.approx([t, t, 0, 0], abs=1e-6)
    assert row_for(rows, [4, 5, 9, 6]).advantages == pytest.approx([0, 0, -t, -t], abs=1e-6)
    assert row_for(rows, [7, 9], PROMPT).advantages == pytest.approx([-t, -t], abs=1e-6)
    assert row_for(rows, [8, 9], PROMPT + [4, 5]).advantages == pytest.approx([t, t], abs=1e-6)


# -- staleness ------------------------------------------------------------------------------
def test_stale_tokens_are_masked_and_counted():
    a = flat([1, 2, 3, 4], 1.0, versions=[3, 4, 5, 2], index=0)
    b = flat([5, 6], 0.0, versions=[5, 5], index=1)
    rows, stats = assign_credit([[a, b]], {}, config(max_staleness=1), BOUNDARY, 5)
    # oldest allowed version 5 - 1 = 4
    assert rows[0].mask == [0, 1, 1, 0] and rows[1].mask == [1, 1]
    assert stats.num_stale_tokens == 2
    rows, stats = assign_credit([[a, b]], {}, config(max_staleness=0), BOUNDARY, 5)
    assert rows[0].mask == [0, 0, 1, 0] and stats.num_stale_tokens == 3


# -- collate --------------------------------------------------------------------------------
def test_collate_positions_padding_masks():
    rows = [TrainRow([10, 11, 12], [20, 21], [-0.1, -0.2], [1.0, 2.0], [1, 0], [0, 0]),
            TrainRow([10], [30, 31, 32], [-0.3, -0.4, -0.5], [-1.0, -2.0, -3.0], [1, 1, 1],
                     [0, 0, 0])]
    b = collate(rows, pad_id=0)
    # L = 5; output token k of a row with P prompt tokens sits at column P-1+k
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21], [10, 30, 31, 32, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b.targets.tolist() == [[11, 12, 20, 21], [30, 31, 32, 0]]
    assert b.old_logprobs[0].tolist() == pytest.approx([0, 0, -0.1, -0.2])
    assert b.old_logprobs[1].tolist() == pytest.approx([-0.3, -0.4, -0.5, 0])
    assert b.advantages.tolist() == [[0, 0, 1, 2], [-1, -2, -3, 0]]
    assert b.mask.tolist() == [[0, 0, 1, 0], [1, 1, 1, 0]]
    assert b.mask.dtype == torch.float32 and b.input_ids.dtype == torch.long


# -- RLConfig -------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, reason", [
    (dict(algo="grpo", segment_weights=True), "algo=grpo"),
    (dict(algo="grpo", erasure_learning="fork"), "algo=grpo"),
    (dict(algo="e3rl", erasure_learning="pairs"), "heal_rollouts"),
    (dict(algo="e3rl", erasure_learning="pairs", heal_rollouts=False), "heal_rollouts"),
    (dict(group_size=1), "group_size"),
    (dict(algo="ppo"), "algo must be one of"),
    (dict(healing="{not json"), "not valid JSON"),
    (dict(healing="[1, 2]"), "JSON object"),
    (dict(algo="e3rl", erasure_learning="tree"), "erasure_learning"),
    (dict(segment_weight_mode="positive"), "segment_weight_mode"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(model=""), "model"),
])
def test_rl_config_refuses_bad_combinations(kw, reason):
    with pytest.raises(ValueError, match=reason):
        RLConfig(**{"model": "x", "output_dir": "y", **kw})


def test_rl_config_component_defaults():
    e = config(algo="e3rl")
    assert (e.heal_rollouts, e.segment_weights, e.erasure_learning) == (
        E3RL_DEFAULTS["heal_rollouts"], E3RL_DEFAULTS["segment_weights"],
        E3RL_DEFAULTS["erasure_learning"])
    override = config(algo="e3rl", segment_weights=False, heal_rollouts=True,
                      erasure_learning="pairs")
    assert (override.heal_rollouts, override.segment_weights, override.erasure_learning) \
        == (True, False, "pairs")
    g = config()
    assert (g.heal_rollouts, g.segment_weights, g.erasure_learning) == (False, False, "off")
    assert config(algo="grpo", segment_weights=False, erasure_learning="off").algo == "grpo"
    assert config(healing='{"max_segment_tokens": 8}').healing_options() == {
        "max_segment_tokens": 8, "enabled": True}
