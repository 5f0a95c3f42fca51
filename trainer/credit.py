"""Credit assignment: episodes and rewards in, training rows with per-token advantages out.

GRPO gives every token of a sample its group-relative advantage. Each E³RL component
changes that in one place, behind its switch in `RLConfig`:

- ``segment_weights``: the sample's advantage is spread over its segments by score
  (`advantages.segment_weights`), token-mean preserved;
- ``erasure_learning="pairs"``: each erasure event adds a bonus on the replacement segment
  and a row for the erased attempt (`advantages.pair_advantages`, or the reward-free rule);
- ``erasure_learning="fork"``: a parent's tokens from its fork point on, and every branch's
  tokens, get the fork's local advantage (`advantages.fork_advantages`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import advantages as adv
from .config import RLConfig
from .rollout import Episode


@dataclass(slots=True)
class TrainRow:
    """One sequence for the loss: tokens ``prompt_ids + output_ids``; the loss covers the
    output tokens whose ``mask`` is 1."""

    prompt_ids: list[int]
    output_ids: list[int]
    old_logprobs: list[float]
    advantages: list[float]
    mask: list[int]
    versions: list[int]


@dataclass(slots=True)
class CreditStats:
    num_rows: int = 0
    num_pair_rows: int = 0
    num_branch_rows: int = 0
    num_stale_tokens: int = 0
    segment_weight_max: float = 1.0


def segment_limits(config: RLConfig) -> tuple[int, int]:
    """(min, max) tokens per segment, from the healing options (the healer's defaults)."""
    options = config.healing_options()
    return options.get("min_segment_tokens", 2), options.get("max_segment_tokens", 64)


def episode_segments(episode: Episode, boundary_ids: frozenset[int],
                     limits: tuple[int, int]) -> tuple[list[tuple[int, int]], list[float]]:
    """Segment spans of an episode's output and their mean-NLL scores (computed once per
    episode; the output of an episode never changes)."""
    if episode.segments is None:
        spans = adv.segment_spans(episode.output_ids, boundary_ids, *limits)
        nll = episode.nll
        episode.segments = (spans, [sum(nll[a:b]) / (b - a) for a, b in spans])
    return episode.segments


def assign_credit(groups: list[list[Episode]], branches: dict[int, list[Episode]],
                  config: RLConfig, boundary_ids: frozenset[int],
                  current_version: int) -> tuple[list[TrainRow], CreditStats]:
    """Rows for the loss from the kept groups (episodes indexed in group order: group g's
    sample j is episode ``g*G + j``) and the fork branches (``branches[e]``: the branches of
    episode ``e``)."""
    stats = CreditStats()
    rewards = torch.tensor([[e.reward for e in group] for group in groups], dtype=torch.float64)
    group_adv = adv.group_advantages(rewards) if groups else rewards
    episodes = [e for group in groups for e in group]
    flat_adv = group_adv.flatten().tolist()
    limits = segment_limits(config)
    rows: list[TrainRow] = []
    episode_rows: dict[int, TrainRow] = {}
    pairs: list[tuple[int, object]] = []  # (episode index, erasure event)
    for i, (episode, a) in enumerate(zip(episodes, flat_adv)):
        token_adv = [a] * len(episode.output_ids)
        if config.segment_weights and (config.segment_weight_mode == "all" or a < 0):
            spans, scores = episode_segments(episode, boundary_ids, limits)
            if len(spans) > 1:
                w = adv.segment_weights(torch.tensor(scores),
                                        torch.tensor([b - s for s, b in spans]),
                                        config.segment_alpha)
                stats.segment_weight_max = max(stats.segment_weight_max, w.max().item())
                for (s, b), wk in zip(spans, w.tolist()):
                    for t in range(s, b):
                        token_adv[t] = a * wk
        if i in branches:
            family = [episode] + branches[i]
            local = adv.fork_advantages(torch.tensor([e.reward for e in family],
                                                     dtype=torch.float64)).tolist()
            pos = branches[i][0].fork_position
            for t in range(pos, len(token_adv)):
                token_adv[t] = local[0]
            for branch, a_b in zip(branches[i], local[1:]):
                rows.append(_row(branch.prompt_ids, branch, [a_b] * len(branch.output_ids),
                                 config, current_version, stats))
                stats.num_branch_rows += 1
        if config.erasure_learning == "pairs":
            pairs += [(i, e) for e in episode.erasures]
        episode_rows[i] = _row(episode.prompt_ids, episode, token_adv, config,
                               current_version, stats)
        rows.append(episode_rows[i])
    if pairs:
        rows += _pair_rows(pairs, episodes, flat_adv, episode_rows, config, current_version,
                           stats)
    stats.num_rows = len(rows)
    return rows, stats


def _pair_rows(pairs: list, episodes: list[Episode], flat_adv: list[float],
               episode_rows: dict[int, TrainRow], config: RLConfig, current_version: int,
               stats: CreditStats) -> list[TrainRow]:
    """Apply the pair rule: replacement bonuses go into the episode's own row, erased
    attempts become rows of their own."""
    if config.reward_free_pairs:
        usable = [(i, e) for i, e in pairs if e.replacement_score is not None]
        gaps = torch.tensor([e.score - e.replacement_score for _, e in usable],
                            dtype=torch.float64)
        values = adv.reward_free_pair_advantages(gaps).tolist()
        bonuses = [(i, e, v, -v) for (i, e), v in zip(usable, values)]
    else:
        bonuses = [(i, e, *adv.pair_advantages(episodes[i].reward, flat_adv[i],
                                               config.pair_delta)) for i, e in pairs]
    out = []
    for i, event, bonus, erased_adv in bonuses:
        episode = episodes[i]
        row = episode_rows[i]
        end = min(event.position + len(event.replacement_token_ids), len(row.advantages))
        for t in range(event.position, end):
            row.advantages[t] += bonus
        if erased_adv == 0.0 or not event.erased_token_ids:
            continue
        erased = Episode(episode.problem, episode.group, episode.index,
                         episode.prompt_ids + episode.output_ids[:event.position],
                         list(event.erased_token_ids), [-x for x in event.erased_nll],
                         list(event.erased_entropy), "", "erased",
                         episode.versions[event.position:event.position + 1]
                         * len(event.erased_token_ids), len(event.erased_token_ids))
        out.append(_row(erased.prompt_ids, erased, [erased_adv] * len(erased.output_ids),
                        config, current_version, stats))
        stats.num_pair_rows += 1
    return out


def _row(prompt_ids: list[int], episode: Episode, token_adv: list[float], config: RLConfig,
         current_version: int, stats: CreditStats) -> TrainRow:
    """A row whose tokens older than the staleness bound are masked (and counted)."""
    oldest = current_version - config.max_staleness
    mask = [1 if v >= oldest else 0 for v in episode.versions]
    stats.num_stale_tokens += mask.count(0)
    return TrainRow(list(prompt_ids), list(episode.output_ids), list(episode.logprobs),
                    token_adv, mask, list(episode.versions))
