"""arith-chain generator: determinism, hash splits, worked solutions, prompt format."""

from __future__ import annotations

import random
import re

import pytest

from e3rl.trainer import arith
from e3rl.trainer.arith import (ANSWER_MARKER, MAX_TRAIN_STEPS, ArithConfig, format_prompt,
                                generate_rows, sample_problem, solve, split_of)
from e3rl.trainer.sft_data import build_arith_tokenizer

_LINE_RE = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")


def test_same_seed_same_rows_other_seed_other_rows():
    assert generate_rows("train", 50, seed=7) == generate_rows("train", 50, seed=7)
    assert generate_rows("train", 50, seed=7) != generate_rows("train", 50, seed=8)


def test_rows_have_deepmath_columns_and_requested_split():
    for split in arith.SPLITS:
        rows = generate_rows(split, 40, seed=1)
        assert len({r["question"] for r in rows}) == 40  # distinct within a call
        for row in rows:
            assert set(row) == {"question", "final_answer", "difficulty", "solution"}
            assert split_of(row["question"]) == split
            assert isinstance(row["final_answer"], str)
            assert row["difficulty"] == float(arith.count_steps(row["question"]))


def test_split_is_a_pinned_function_of_the_text():
    # Changing the hash (salt, cuts) would silently move test problems into training.
    assert [split_of(q) for q in ("47+38-19+56", "10+10", "60+75-89+70-94+16", "14+11-21")] == \
        ["train", "train", "validation", "test"]
    assert split_of("1+2+3+4+5+6+7") == "hard"


def test_no_seed_leaks_held_out_problems_into_training():
    train = {r["question"] for seed in range(20) for r in generate_rows("train", 300, seed)}
    held_out = {r["question"] for seed in range(20) for split in ("validation", "test")
                for r in generate_rows(split, 100, seed)}
    assert len(train) > 5000 and len(held_out) > 3000
    assert not train & held_out
    assert all(split_of(q) == "train" for q in train)


def test_split_sizes_follow_the_hash_cuts():
    rng = random.Random(0)
    counts = {s: 0 for s in arith.SPLITS}
    for _ in range(4000):
        counts[split_of(sample_problem(rng, ArithConfig()).question)] += 1
    assert counts["hard"] == 0
    assert 0.76 < counts["train"] / 4000 < 0.84
    assert 0.08 < counts["test"] / 4000 < 0.12


def test_hard_split_has_more_steps_than_training():
    hard = generate_rows("hard", 100, seed=0)
    train = generate_rows("train", 500, seed=0)
    assert min(r["difficulty"] for r in hard) > MAX_TRAIN_STEPS
    assert max(r["difficulty"] for r in train) <= MAX_TRAIN_STEPS
    with pytest.raises(ValueError, match="hard split"):
        generate_rows("train", 1, 0, ArithConfig(min_steps=2, max_steps=MAX_TRAIN_STEPS + 1))
    with pytest.raises(ValueError, match="min_steps"):
        generate_rows("hard", 1, 0, ArithConfig())


@pytest.mark.parametrize("config", [ArithConfig(), ArithConfig(digits=3, operators="+-*"),
                                    ArithConfig(digits=1, allow_negative=True)])
def test_solution_lines_are_correct_arithmetic(config):
    rng = random.Random(3)
    for _ in range(300):
        row = sample_problem(rng, config).to_row()
        *steps, answer_line = row["solution"].split("\n")
        assert answer_line == f"{ANSWER_MARKER} {row['final_answer']}"
        assert len(steps) == row["difficulty"]
        previous = None
        for line in steps:
            left, op, right, result = _LINE_RE.match(line).groups()
            left, right, result = int(left), int(right), int(result)
            assert result == {"+": left + right, "-": left - right, "*": left * right}[op]
            assert previous is None or left == previous  # each step starts from the last result
            if not config.allow_negative:
                assert result >= 0
            previous = result
        assert previous == int(row["final_answer"])
        # The question means the same under ordinary precedence (brackets before '*').
        assert eval(row["question"]) == previous  # noqa: S307 - digits and +-*() only


def test_solve_rejects_non_chain_text():
    with pytest.raises(ValueError):
        solve("47+")
    with pytest.raises(ValueError):
        solve("hello")
    assert solve("47+38-19+56").step_lines == ("47+38=85", "85-19=66", "66+56=122")


def test_chat_template_renders_the_prompt_format():
    tok = build_arith_tokenizer()
    row = generate_rows("test", 1, seed=0)[0]
    user = [{"role": "user", "content": row["question"]}]
    rendered = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert rendered == format_prompt(row["question"]) == f"Q: {row['question']}\nA:\n"
    full = tok.apply_chat_template(user + [{"role": "assistant", "content": row["solution"]}],
                                   tokenize=False)
    assert full == format_prompt(row["question"]) + row["solution"] + tok.eos_token
    ids = tok.encode(full, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == full.removesuffix(tok.eos_token)
