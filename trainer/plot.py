"""Compare RL runs in one PNG, drawn from their JSONL training logs.

Each log holds one JSON object per line. ``"event": "train"`` lines carry ``step``,
``sampled_tokens`` (cumulative), ``reward`` (the step's mean) and ``erasure_rate`` (erasures per
segment; 0 or absent when healing is off); ``"event": "eval"`` lines carry ``step``,
``sampled_tokens``, ``greedy_pass@1`` and ``sampled_pass@1``. Other events are ignored. Three
panels share the x axis, sampled tokens, so runs with different batch sizes compare fairly:
pass@1, reward, erasure rate; one colour per run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .run_log import read_records

logger = logging.getLogger(__name__)

REWARD_WINDOW = 10  # steps in the reward's rolling mean
TRAIN_KEYS = ("step", "sampled_tokens", "reward")
EVAL_KEYS = ("step", "sampled_tokens", "greedy_pass@1", "sampled_pass@1")


@dataclass(slots=True)
class RunCurves:
    """The usable lines of one run's log, in file order."""

    label: str
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


def default_label(path: Path) -> str:
    """The log's parent directory name (a run directory), else the file's stem."""
    return path.resolve().parent.name or path.stem


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _number(value: object) -> float:
    """``value`` as a float; 0 when absent or not a number (healing off)."""
    return float(value) if isinstance(value, (int, float)) else 0.0


def _usable(record: dict, keys: tuple[str, ...]) -> bool:
    return all(isinstance(record.get(k), (int, float)) for k in keys)


def read_run(path: Path, label: str) -> RunCurves:
    """The train and eval lines of one log. Raises ``ValueError`` for a missing or
    unreadable file, or one without a usable train or eval line."""
    if not path.is_file():
        raise ValueError(f"log file {str(path)!r} does not exist")
    run = RunCurves(label)
    for record in read_records(path):
        event = record.get("event")
        if event == "train" and _usable(record, TRAIN_KEYS):
            run.train.append(record)
        elif event == "eval" and _usable(record, EVAL_KEYS):
            run.evals.append(record)
    if not run.train and not run.evals:
        raise ValueError(f"log file {str(path)!r} holds no usable train or eval line")
    return run


def _draw_run(axes: list, run: RunCurves, color: str) -> None:
    """One run's lines on the three panels (pass@1, reward, erasure rate)."""
    pass_ax, reward_ax, erasure_ax = axes
    if run.evals:
        x = [r["sampled_tokens"] for r in run.evals]
        pass_ax.plot(x, [r["greedy_pass@1"] for r in run.evals], "-", marker=".", color=color)
        pass_ax.plot(x, [r["sampled_pass@1"] for r in run.evals], "--", marker=".",
                     color=color)
    if run.train:
        x = [r["sampled_tokens"] for r in run.train]
        rewards = [float(r["reward"]) for r in run.train]
        reward_ax.plot(x, rewards, color=color, alpha=0.2, linewidth=0.8)
        reward_ax.plot(x, rolling_mean(rewards, REWARD_WINDOW), color=color)
        erasures = [_number(r.get("erasure_rate")) for r in run.train]
        erasure_ax.plot(x, erasures, color=color)


def plot_runs(log_paths: list[Path], out_png: Path, labels: list[str] | None = None) -> Path:
    """Draw the runs of ``log_paths`` side by side into ``out_png`` (created with its parent
    directories) and return it. ``labels`` default to each log's parent directory name.
    Raises ``ValueError`` for a missing log, a log without a usable line, or a label count
    that does not match."""
    paths = [Path(p) for p in log_paths]
    if not paths:
        raise ValueError("no log file to plot")
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} label(s) for {len(paths)} log file(s)")
    names = labels if labels is not None else [default_label(p) for p in paths]
    runs = [read_run(p, name) for p, name in zip(paths, names)]

    fig = Figure(figsize=(16, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg: files only, no display, no pyplot state
    axes = list(fig.subplots(1, 3))
    handles = []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        _draw_run(axes, run, color)
        handles.append(Line2D([], [], color=color, label=run.label))
    titles = ["pass@1 (greedy solid, sampled dashed)",
              f"reward ({REWARD_WINDOW}-step mean, raw faint)", "erasures per segment"]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("sampled tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(runs), 6))

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    logger.info("plotted %d run(s) into %s", len(runs), out)
    return out
