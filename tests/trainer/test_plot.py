"""The run comparison plot: synthetic logs in, a PNG out; bad logs refused by name."""

import json
import logging
from pathlib import Path

import pytest

from e3rl.trainer.plot import default_label, plot_runs, read_run, rolling_mean

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_log(path: Path, num_steps: int, healing: bool, tail: str = "") -> Path:
    """A synthetic RL log: a train line per step, an eval line every 5 steps, other events."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"event": "start", "config": {"lr": 1e-5}}]
    for step in range(1, num_steps + 1):
        train = {"event": "train", "step": step, "sampled_tokens": 512 * step,
                 "reward": (step % 3) / 3 + step / (2 * num_steps), "loss": 0.1}
        if healing:
            train["erasure_rate"] = 0.5 / step
        lines.append(train)
        if step % 5 == 0:
            score = step / num_steps
            lines.append({"event": "eval", "step": step, "sampled_tokens": 512 * step,
                          "greedy_pass@1": score, "sampled_pass@1": score / 2})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + tail)
    return path


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_SIGNATURE) and len(data) > 10_000


def test_two_runs_make_a_png(tmp_path):
    heal = _write_log(tmp_path / "heal" / "train_log.jsonl", 30, healing=True)
    plain = _write_log(tmp_path / "plain" / "train_log.jsonl", 20, healing=False)
    out = plot_runs([heal, plain], tmp_path / "plots" / "runs.png")
    assert out == tmp_path / "plots" / "runs.png"
    assert _is_png(out)


def test_explicit_labels_must_match_the_logs(tmp_path):
    log = _write_log(tmp_path / "a" / "log.jsonl", 5, healing=True)
    assert _is_png(plot_runs([log], tmp_path / "one.png", labels=["heal"]))
    with pytest.raises(ValueError, match="2 label"):
        plot_runs([log], tmp_path / "x.png", labels=["a", "b"])


def test_default_label_is_the_run_directory(tmp_path):
    assert default_label(tmp_path / "run-7" / "train_log.jsonl") == "run-7"
    assert default_label(Path("/train_log.jsonl")) == "train_log"


def test_missing_file_is_refused_by_name(tmp_path):
    good = _write_log(tmp_path / "a" / "log.jsonl", 5, healing=True)
    missing = tmp_path / "nope" / "log.jsonl"
    with pytest.raises(ValueError, match="nope") as info:
        plot_runs([good, missing], tmp_path / "x.png")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_log_without_usable_line_is_refused(tmp_path):
    empty = tmp_path / "empty" / "log.jsonl"
    empty.parent.mkdir()
    empty.write_text(json.dumps({"event": "start"}) + "\n" + json.dumps({"event": "train"}) + "\n")
    with pytest.raises(ValueError, match="no usable"):
        plot_runs([empty], tmp_path / "x.png")


def test_truncated_last_line_is_tolerated_with_a_warning(tmp_path, caplog):
    log = _write_log(tmp_path / "killed" / "log.jsonl", 12, healing=True,
                     tail='{"event": "train", "step": 13, "sampled_')
    with caplog.at_level(logging.WARNING, logger="e3rl.trainer.plot"):
        run = read_run(log, "killed")
        out = plot_runs([log], tmp_path / "killed.png")
    assert len(run.train) == 12 and len(run.evals) == 2
    assert "truncated" in caplog.text
    assert _is_png(out)


def test_corrupt_line_in_the_middle_is_refused(tmp_path):
    log = _write_log(tmp_path / "bad" / "log.jsonl", 3, healing=True)
    lines = log.read_text().splitlines()
    lines[2] = lines[2][:10]
    log.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 3"):
        read_run(log, "bad")


def test_rolling_mean_hand_values():
    assert rolling_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert rolling_mean([], 10) == []


def test_train_plot_cli(tmp_path):
    import subprocess
    import sys

    e3rl = Path(sys.executable).parent / "e3rl"
    a = _write_log(tmp_path / "grpo" / "train_log.jsonl", 12, healing=False)
    b = _write_log(tmp_path / "e3rl" / "train_log.jsonl", 12, healing=True)
    out = tmp_path / "curves.png"
    done = subprocess.run([str(e3rl), "train", "plot", str(a), str(b), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _is_png(out)
    bad = subprocess.run([str(e3rl), "train", "plot", str(a), str(b), "--out", str(out),
                          "--labels", "only-one"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "e3rl: error: --labels has 1 names for 2 logs"
