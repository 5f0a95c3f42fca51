"""Sampling as pure tensor functions: logits processing, sampling, log-probs, NLL, entropy.

NLL and entropy are taken under the distribution each token was drawn from: the model's
distribution scaled by the temperature and cut by top-k / top-p / min-p (for greedy rows,
the raw distribution at temperature 1). ``logprobs`` are the raw model log-probs
(temperature 1), as vLLM reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import kernels


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters for ``N`` rows of logits."""

    temperatures: torch.Tensor  # [N] float, 0 = greedy
    top_k: torch.Tensor  # [N] long, 0 = off
    top_p: torch.Tensor  # [N] float, 1 = off
    min_p: torch.Tensor  # [N] float, 0 = off
    generators: list[torch.Generator | None]  # per row; None for greedy rows
    banned: list[list[int]]  # per row: token ids that must not be sampled (e.g. EOS < min_tokens)
    max_num_logprobs: int = 0  # top-N log-probs wanted by any row
    any_top_k: bool = False
    any_top_p: bool = False
    any_min_p: bool = False


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [N] long
    logprobs: torch.Tensor  # [N] raw log-prob of the sampled token
    nll: torch.Tensor  # [N] -log p(token) under the sampling distribution
    entropy: torch.Tensor  # [N] entropy of the sampling distribution
    top_ids: torch.Tensor | None  # [N, K] raw top-K token ids
    top_logprobs: torch.Tensor | None  # [N, K]


def apply_top_k_top_p_min_p(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Mask (to -inf) the tokens each row's top-k / top-p / min-p excludes. [N, V] -> [N, V]."""
    if batch.any_min_p:
        probs = logits.softmax(-1)
        cutoff = probs.max(-1, keepdim=True).values * batch.min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < cutoff, float("-inf"))
    if not (batch.any_top_k or batch.any_top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [N, V]
    vocab = logits.shape[-1]
    if batch.any_top_k:
        k = torch.where(batch.top_k > 0, batch.top_k.clamp(max=vocab), vocab)  # [N]
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= k.unsqueeze(1), float("-inf"))
    if batch.any_top_p:
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        mass_before = probs.cumsum(-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= batch.top_p.unsqueeze(1),
                                                  float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """Sample one token per row of ``logits`` [N, V] (float32)."""
    if any(batch.banned):
        logits = logits.clone()  # the caller's logits may be an inference tensor; never edit them
        for row, banned in enumerate(batch.banned):
            if banned:
                logits[row, banned] = float("-inf")
    all_greedy = all(g is None for g in batch.generators)
    if (all_greedy and batch.max_num_logprobs == 0 and logits.device.type == "cpu"
            and kernels.loaded()):
        token_ids, logprobs, entropy = kernels.greedy_sample(logits.contiguous())
        return SamplerOutput(token_ids, logprobs, -logprobs, entropy, None, None)
    raw_logprobs = logits.log_softmax(-1)  # [N, V]
    greedy = batch.temperatures == 0  # [N]
    if all_greedy:  # the raw distribution
        logp = raw_logprobs
    else:
        temps = torch.where(greedy, torch.ones_like(batch.temperatures), batch.temperatures)
        scaled = logits / temps.unsqueeze(1)
        if batch.any_top_k or batch.any_top_p or batch.any_min_p:
            cut = apply_top_k_top_p_min_p(scaled, batch)
            scaled = torch.where(greedy.unsqueeze(1), scaled, cut)
        logp = scaled.log_softmax(-1)  # [N, V] sampling distribution
    probs = logp.exp()
    token_ids = logits.argmax(-1)  # greedy rows
    sampled_rows = [row for row, gen in enumerate(batch.generators) if gen is not None]
    if sampled_rows:
        # Gumbel-max with exponential noise: argmax p / q, q ~ Exp(1), each row's noise from
        # its own generator, so a seeded row is reproducible whatever else is in the batch.
        # The draws stay one per row (the generators differ); the division and argmax run
        # once for the batch. Greedy rows keep noise 1 and their logits' argmax.
        noise = torch.ones_like(probs)  # [N, V]
        for row in sampled_rows:
            noise[row].exponential_(generator=batch.generators[row])
        drawn = (probs / noise).argmax(-1)  # [N]
        if len(sampled_rows) == len(batch.generators):
            token_ids = drawn
        else:
            is_sampled = torch.tensor([g is not None for g in batch.generators],
                                      device=logits.device)
            token_ids = torch.where(is_sampled, drawn, token_ids)
    picked = token_ids.unsqueeze(1)
    nll = -logp.gather(1, picked).squeeze(1)
    entropy = -(probs * logp.masked_fill(probs == 0, 0.0)).sum(-1)
    logprobs = raw_logprobs.gather(1, picked).squeeze(1)
    top_ids = top_lp = None
    if batch.max_num_logprobs > 0:
        top_lp, top_ids = raw_logprobs.topk(batch.max_num_logprobs, dim=-1)
    return SamplerOutput(token_ids, logprobs, nll, entropy, top_ids, top_lp)
