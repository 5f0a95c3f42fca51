"""Is the uncertainty signal real? Label each step line of an arith-chain completion right or
wrong, score it from its tokens' NLL / entropy, and measure how well each score separates
the first wrong step of failed solutions from correct steps (AUROC). Also gives the
calibrated thresholds ``e3rl calibrate`` stores: a quantile of correct steps' scores."""

from __future__ import annotations

import re

import numpy as np

from e3rl.engine.healer.segmenter import segment_score

from .arith import solve

SCORES = ("mean_nll", "max_nll", "mean_entropy")
_STEP_RE = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")


def token_lines(tokenizer, token_ids: list[int]) -> list[int]:
    """The line index of every output token (a token ending a line belongs to that line)."""
    lines, line = [], 0
    for tok in token_ids:
        lines.append(line)
        line += tokenizer.decode([tok]).count("\n")
    return lines


def label_steps(question: str, completion: str) -> list[bool]:
    """Per step line of ``completion`` (before the answer line): is it the right step?
    A step is right when it starts from the right previous value and computes correctly."""
    reference = solve(question)
    labels = []
    for i, line in enumerate(completion.split("\n")):
        if line.startswith("answer") or i >= 64:
            break
        labels.append(i < len(reference.step_lines) and line.strip() == reference.step_lines[i])
    return labels


def step_records(question: str, text: str, token_ids: list[int], nll: list[float],
                 entropy: list[float], tokenizer) -> list[tuple[bool, dict[str, float]]]:
    """(is_correct, scores) for each correct step and the first wrong step of a completion."""
    labels = label_steps(question, text)
    lines = token_lines(tokenizer, token_ids)
    records = []
    for i, ok in enumerate(labels):
        idx = [k for k, line in enumerate(lines) if line == i]
        if not idx:
            break
        n, h = [nll[k] for k in idx], [entropy[k] for k in idx]
        records.append((ok, {s: segment_score(s, n, h) for s in SCORES}))
        if not ok:
            break  # after the first mistake, later steps are judged against a wrong value
    return records


def auroc(positives: list[float], negatives: list[float]) -> float | None:
    """P(score of a wrong step > score of a correct step), ties counted half."""
    if not positives or not negatives:
        return None
    pos, neg = np.asarray(positives), np.asarray(negatives)
    ranks = np.concatenate([pos, neg]).argsort().argsort().astype(float)
    # Average ranks over ties.
    values = np.concatenate([pos, neg])
    for v in np.unique(values):
        where = values == v
        ranks[where] = ranks[where].mean()
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) - 1) / 2) / (len(pos) * len(neg)))


def summarize(records: list[tuple[bool, dict[str, float]]]) -> dict:
    """Mean scores of correct and first-wrong steps, and each score's AUROC."""
    out = {"num_correct_steps": sum(ok for ok, _ in records),
           "num_first_wrong_steps": sum(not ok for ok, _ in records)}
    for s in SCORES:
        good = [r[s] for ok, r in records if ok]
        bad = [r[s] for ok, r in records if not ok]
        out[s] = {"correct_mean": float(np.mean(good)) if good else None,
                  "first_wrong_mean": float(np.mean(bad)) if bad else None,
                  "auroc": auroc(bad, good)}
    return out
