"""The PNG loss curve of a training run, drawn from its JSONL log."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from .plot import rolling_mean  # noqa: E402


def plot_loss_curve(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Plot train loss per step (raw and smoothed) and validation loss / sequence accuracy
    from ``records`` (the rows of train_log.jsonl) into ``path``."""
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
        ax.plot(steps, rolling_mean(losses, 20), color="tab:blue", label="train loss (20-step mean)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
                color="tab:orange", label="validation loss")
        acc_ax = ax.twinx()
        acc_ax.plot([r["step"] for r in evals], [r["val_seq_acc"] for r in evals], "s--",
                    color="tab:green", label="validation teacher-forced exact")
        acc_ax.set_ylim(0, 1)
        acc_ax.set_ylabel("fraction of solutions exactly right")
        handles, labels = ax.get_legend_handles_labels()
        acc_handles, acc_labels = acc_ax.get_legend_handles_labels()
        acc_ax.legend(handles + acc_handles, labels + acc_labels, loc="upper center",
                      fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per solution token (nats)")
    ax.set_title(title or "SFT loss")
    if not evals:
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
