"""Learning signals from served traffic: trajectory records in, training rows out.

A record (the server's trajectory store, ``GET /v1/trajectories``) is *usable* when its
logged log-probs are the policy's at the trainer's temperature (sampled at that temperature
with top-p 1 and no top-k / min-p), it finished (stop or length), its weights are at most
``max_staleness`` updates behind the trainer, and it carries a signal:

- ``reward``: the client's feedback (a reward, or a reference answer the trainer grades).
  Samples of one request (``n`` > 1) are centred on their own mean (GRPO's group); single
  samples on a running mean of rewards. E³RL then spreads the advantage over the segments
  by score and applies the pair rule to erasure events (DESIGN, "Trainer").
- ``reward-free``: no feedback, but erasure events: the pair rule without a reward
  (``advantages.reward_free_pair_advantages``). Only the replacement segment and the erased
  attempt are trained (the rest of the sample carries no signal).

Every record that is not used gets a reason, so the trainer can count what it skipped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from . import advantages as adv
from .config import FollowConfig
from .credit import TrainRow
from .datasets import Problem
from .rewards import reward as grade_reward

SKIP_REASONS = ("unfinished", "greedy", "sampling_mismatch", "stale", "no_signal",
                "malformed", "duplicate")


@dataclass(slots=True)
class Usable:
    """A record the trainer will learn from, and the signal it carries."""

    record: dict
    signal: str  # "reward" or "reward-free"
    reward: float | None = None


@dataclass(slots=True)
class RowStats:
    num_rows: int = 0
    num_pair_rows: int = 0
    num_reward_free_pairs: int = 0
    num_stale_tokens: int = 0
    rewards: list[float] = field(default_factory=list)


def task_of(record: dict) -> str:
    """How a reference answer is graded: arith-chain prompts (``Q: <chain>\nA:\n``)
    exactly, the rest with math-verify."""
    from .arith import solve

    prompt = record.get("prompt") or ""
    if prompt.startswith("Q: ") and prompt.endswith("\nA:\n"):
        try:
            solve(prompt[3:-4])
            return "arith"
        except ValueError:
            pass
    return "math"


def feedback_reward(record: dict) -> float | None:
    """The record's reward: the client's, or its reference answer graded (None: none)."""
    feedback = record.get("feedback")
    if not feedback:
        return None
    if feedback.get("reward") is not None:
        return float(feedback["reward"])
    reference = feedback.get("reference")
    if reference is None:
        return None
    problem = Problem(question=record.get("prompt") or "", answer=str(reference),
                      prompt=record.get("prompt") or "", task=task_of(record))
    return grade_reward(problem, record.get("text") or "")


def classify(record: dict, config: FollowConfig, version_index: dict[str, int],
             current: int) -> Usable | str:
    """A `Usable`, or the reason (one of ``SKIP_REASONS``) the record is not used."""
    try:
        sampling = record["sampling_params"]
        output = record["output_token_ids"]
        nll = record["nll"]
        if len(nll) != len(output) or not record["prompt_token_ids"]:
            return "malformed"
    except (KeyError, TypeError):
        return "malformed"
    if record.get("finish_reason") not in ("stop", "length") or not output:
        return "unfinished"
    temperature = float(sampling.get("temperature") or 0.0)
    if temperature <= 0:
        return "greedy"
    if (abs(temperature - config.temperature) > 1e-6 or sampling.get("top_p", 1.0) != 1.0
            or (sampling.get("top_k") or 0) > 0 or (sampling.get("min_p") or 0.0) > 0):
        return "sampling_mismatch"
    index = version_index.get(str(record.get("weight_version")))
    if index is None or current - index > config.max_staleness:
        return "stale"
    signals = config.signal_set()
    if "rewards" in signals:
        value = feedback_reward(record)
        if value is not None and math.isfinite(value):
            return Usable(record, "reward", value)
    if "reward-free" in signals and _pairs(record):
        return Usable(record, "reward-free")
    return "no_signal"


def _pairs(record: dict) -> list[dict]:
    """Erasure events whose replacement was accepted (both sides scored)."""
    return [e for e in record.get("erasures") or []
            if e.get("replacement_score") is not None and e.get("erased_token_ids")]


def build_rows(batch: list[Usable], config: FollowConfig, baseline: float | None,
               version_index: dict[str, int],
               current: int) -> tuple[list[TrainRow], RowStats, float | None]:
    """Rows for the loss and the updated running reward mean (``baseline``). Tokens
    sampled by weights more than ``max_staleness`` updates behind ``current`` (or by an
    unknown version) are masked and counted."""
    stats = RowStats()
    rows: list[TrainRow] = []
    rewarded = [u for u in batch if u.signal == "reward"]
    groups: dict[str, list[Usable]] = defaultdict(list)
    for u in rewarded:
        groups[str(u.record.get("request_id"))].append(u)
    singles = [g[0] for g in groups.values() if len(g) == 1]
    if singles:
        mean = sum(u.reward for u in singles) / len(singles)
        centre = mean if baseline is None else baseline
        baseline = mean if baseline is None else (config.baseline_momentum * baseline
                                                  + (1 - config.baseline_momentum) * mean)
    for members in groups.values():
        rs = [u.reward for u in members]
        stats.rewards += rs
        centre_g = sum(rs) / len(rs) if len(members) > 1 else centre
        for u in members:
            a = u.reward - centre_g
            if a == 0.0:
                continue
            rows += _rewarded_rows(u.record, a, u.reward, config, version_index, stats)
    free = [u.record for u in batch if u.signal == "reward-free"]
    if free:
        rows += _reward_free_rows(free, version_index, stats)
    oldest = current - config.max_staleness
    for row in rows:
        for t, v in enumerate(row.versions):
            if row.mask[t] and (v < 0 or v < oldest):
                row.mask[t] = 0
                stats.num_stale_tokens += 1
    stats.num_rows = len(rows)
    return rows, stats, baseline


def _versions(record: dict, num_tokens: int, version_index: dict[str, int]) -> list[int]:
    """One update index per output token (unknown versions: -1, i.e. always stale)."""
    runs = sorted((int(pos), version_index.get(str(v), -1))
                  for pos, v in record.get("weight_versions") or [])
    if not runs:
        return [version_index.get(str(record.get("weight_version")), -1)] * num_tokens
    out = [runs[0][1]] * num_tokens
    for k, (start, index) in enumerate(runs):
        end = runs[k + 1][0] if k + 1 < len(runs) else num_tokens
        for t in range(start, min(end, num_tokens)):
            out[t] = index
    return out


def _rewarded_rows(record: dict, a: float, r: float, config: FollowConfig,
                   version_index: dict[str, int], stats: RowStats) -> list[TrainRow]:
    output = list(record["output_token_ids"])
    token_adv = [a] * len(output)
    segments = [(int(s["start"]), int(s["end"]), float(s["score"]))
                for s in record.get("segments") or [] if s["end"] > s["start"]]
    if config.segment_weights and len(segments) > 1:
        w = adv.segment_weights(torch.tensor([s for _, _, s in segments]),
                                torch.tensor([b - s for s, b, _ in segments]),
                                config.segment_alpha)
        for (s, b, _), wk in zip(segments, w.tolist()):
            for t in range(s, min(b, len(output))):
                token_adv[t] = a * wk
    versions = _versions(record, len(output), version_index)
    logprobs = [-x for x in record["nll"]]
    rows = []
    bonus, erased_adv = adv.pair_advantages(r, a, config.pair_delta)
    for event in _pairs(record) if bonus else []:
        pos = int(event["position"])
        for t in range(pos, min(pos + len(event["replacement_token_ids"]), len(output))):
            token_adv[t] += bonus
        rows.append(_erased_row(record, event, erased_adv, versions))
        stats.num_pair_rows += 1
    rows.insert(0, TrainRow(list(record["prompt_token_ids"]), output, logprobs, token_adv,
                            [1] * len(output), versions))
    return rows


def _erased_row(record: dict, event: dict, value: float, versions: list[int]) -> TrainRow:
    """The erased attempt as a row of its own: the sample's prefix up to the erasure, then
    the erased tokens (with their logged log-probs), all with advantage ``value``."""
    pos = int(event["position"])
    erased = list(event["erased_token_ids"])
    version = versions[pos] if pos < len(versions) else (versions[-1] if versions else -1)
    prefix = list(record["prompt_token_ids"]) + list(record["output_token_ids"][:pos])
    return TrainRow(prefix, erased, [-x for x in event["erased_nll"]], [value] * len(erased),
                    [1] * len(erased), [version] * len(erased))


def _reward_free_rows(records: list[dict], version_index: dict[str, int],
                      stats: RowStats) -> list[TrainRow]:
    """The pair rule without rewards over every pair of the batch (sigma_D over the batch);
    only the replacement span and the erased attempt are trained."""
    events = [(r, e) for r in records for e in _pairs(r)]
    gaps = torch.tensor([e["score"] - e["replacement_score"] for _, e in events],
                        dtype=torch.float64)
    values = adv.reward_free_pair_advantages(gaps).tolist()
    rows = []
    per_record: dict[str, TrainRow] = {}
    for (record, event), v in zip(events, values):
        if v == 0.0:
            continue
        stats.num_reward_free_pairs += 1
        output = list(record["output_token_ids"])
        versions = _versions(record, len(output), version_index)
        row = per_record.get(record["id"])
        if row is None:
            row = TrainRow(list(record["prompt_token_ids"]), output,
                           [-x for x in record["nll"]], [0.0] * len(output),
                           [0] * len(output), versions)
            per_record[record["id"]] = row
            rows.append(row)
        pos = int(event["position"])
        for t in range(pos, min(pos + len(event["replacement_token_ids"]), len(output))):
            row.advantages[t] += v
            row.mask[t] = 1
        rows.append(_erased_row(record, event, -v, versions))
        stats.num_pair_rows += 1
    return rows
