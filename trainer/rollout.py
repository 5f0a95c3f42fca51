"""Rollouts: G samples per prompt through the in-process engine, as typed episodes.

Each sampled token keeps what the loss and the E³RL components need: its behaviour
log-prob (``-nll`` under the sampling distribution the engine drew it from), its entropy,
the weight version that sampled it; each sample keeps its erasure events (with the erased
attempt) when healing was on. Branches (E³RL's fork rule) are episodes whose prompt is a
parent's prompt plus the parent's output up to the fork point.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from e3rl.engine import LLM, ErasureEvent, SamplingParams

from .datasets import Problem


@dataclass(slots=True)
class Episode:
    """One sampled completion (or a branch of one) and its reward."""

    problem: Problem
    group: int  # global index of the problem in the prompt stream
    index: int  # sample index within the group
    prompt_ids: list[int]  # for a branch: the parent's prompt + output[:fork_position]
    output_ids: list[int]
    logprobs: list[float]  # behaviour log-prob of each output token
    entropy: list[float]
    text: str  # the whole completion (for a branch: parent's text up to the fork + branch)
    finish_reason: str
    versions: list[int]  # weight version that sampled each output token
    num_computed_tokens: int
    erasures: list[ErasureEvent] = field(default_factory=list)
    reward: float = 0.0
    fork_position: int = 0  # branches: output position in the parent where they start
    # (spans, mean-NLL scores) of the output's segments, filled once by
    # `credit.episode_segments` (the collection, fork and credit steps all read them).
    segments: tuple[list[tuple[int, int]], list[float]] | None = None

    @property
    def nll(self) -> list[float]:
        return [-lp for lp in self.logprobs]


def stream_seed(seed: int, step: int, kind: str, index: int) -> int:
    """An independent, reproducible sampling seed per (run seed, step, purpose, index)."""
    return random.Random(f"{seed}:{step}:{kind}:{index}").getrandbits(62)


def token_versions(weight_versions: list[tuple[int, str]], num_tokens: int) -> list[int]:
    """Expand the engine's ``[(output_index, version), ...]`` runs to one int per token."""
    versions = [0] * num_tokens
    runs = sorted(weight_versions)
    for k, (start, version) in enumerate(runs):
        end = runs[k + 1][0] if k + 1 < len(runs) else num_tokens
        for i in range(start, min(end, num_tokens)):
            versions[i] = int(version)
    return versions


def sample_groups(llm: LLM, problems: list[Problem], group_size: int, *, temperature: float,
                  max_tokens: int, seeds: list[int], group_ids: list[int],
                  healing: dict | None = None) -> list[list[Episode]]:
    """``group_size`` samples of every problem (one request with ``n = group_size``, so the
    samples share the prompt's KV blocks), healed when ``healing`` is given."""
    params = [SamplingParams(n=group_size, temperature=temperature, max_tokens=max_tokens,
                             seed=seed, healing=healing) for seed in seeds]
    outputs = llm.generate([p.prompt for p in problems], params, use_tqdm=False)
    groups = []
    for gid, problem, out in zip(group_ids, problems, outputs):
        groups.append([_episode(problem, gid, out.prompt_token_ids, o, o.text)
                       for o in out.outputs])
    return groups


def sample_branches(llm: LLM, parents: list[Episode], positions: list[int],
                    num_branches: int, *, temperature: float, max_tokens: int,
                    seeds: list[int]) -> list[list[Episode]]:
    """``num_branches`` new continuations of each parent from ``positions[i]`` (an output
    index: the parent's tokens before it are kept, everything from it is sampled anew)."""
    tokenizer = llm.tokenizer
    prompts, params = [], []
    for parent, pos, seed in zip(parents, positions, seeds):
        prompts.append(parent.prompt_ids + parent.output_ids[:pos])
        params.append(SamplingParams(n=num_branches, temperature=temperature,
                                     max_tokens=max_tokens - pos, seed=seed))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    branches = []
    for parent, pos, out in zip(parents, positions, outputs):
        kept = parent.output_ids[:pos]
        per = []
        for o in out.outputs:
            text = tokenizer.decode(kept + o.token_ids, skip_special_tokens=True)
            episode = _episode(parent.problem, parent.group, out.prompt_token_ids, o, text)
            episode.fork_position = pos
            per.append(episode)
        branches.append(per)
    return branches


def _episode(problem: Problem, group: int, prompt_ids: list[int], o, text: str) -> Episode:
    return Episode(problem=problem, group=group, index=o.index, prompt_ids=list(prompt_ids),
                   output_ids=list(o.token_ids), logprobs=[-x for x in o.nll],
                   entropy=list(o.entropy), text=text, finish_reason=o.finish_reason,
                   versions=token_versions(o.weight_versions, len(o.token_ids)),
                   num_computed_tokens=o.num_computed_tokens, erasures=list(o.erasures))
