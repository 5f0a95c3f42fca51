"""The data and train subcommands, through the stand-alone entry point."""

from __future__ import annotations

import json

import pytest

from e3rl.trainer.arith import split_of
from e3rl.trainer.cli import main


def test_data_writes_jsonl_with_deepmath_columns(tmp_path):
    out = tmp_path / "sub" / "val.jsonl"
    rc = main(["data", "arith-chain", "--split", "validation", "--seed", "3", "--num", "25",
               "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 25
    for row in rows:
        assert set(row) == {"question", "final_answer", "difficulty", "solution"}
        assert split_of(row["question"]) == "validation"


@pytest.mark.parametrize("argv", [
    ["data", "arith-chain", "--split", "nope", "--num", "3", "--out", "x.jsonl"],
    ["data", "arith-chain", "--split", "train", "--num", "3", "--out", "x.jsonl",
     "--max-steps", "9"],
    ["data", "arith-chain", "--split", "test", "--num", "0", "--out", "x.jsonl"],
    ["train", "sft", "--out-dir", "x", "--num-steps", "0"],
    ["train", "sft", "--out-dir", "x", "--model-type", "gpt2"],
])
def test_errors_are_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("e3rl: error: ") and err.count("\n") == 1


def test_train_sft_runs_from_the_command_line(tmp_path):
    out = tmp_path / "model"
    rc = main(["train", "sft", "--out-dir", str(out), "--num-steps", "1", "--hidden-size", "32",
               "--intermediate-size", "64", "--num-layers", "1", "--num-heads", "2",
               "--batch-size", "4", "--num-eval-problems", "4", "--no-progress"])
    assert rc == 0
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "sft_config.json").read_text())["num_steps"] == 1
