"""Policy losses: pure tensor functions (token-mean, masked), shapes in docstrings.

The behaviour log-probs are the ones the engine logged while sampling (``-nll`` of each
sampled token under the sampling distribution): no extra forward pass is needed for them,
and a test checks that they equal the trainer's own forward within 1e-4 in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class LossTerms:
    """Sums over the unmasked tokens of a micro-batch (divide by the global token count)."""

    loss_sum: torch.Tensor  # scalar, differentiable
    num_clipped: float
    kl_sum: float
    ratio_sum: float


def token_log_probs(logits: torch.Tensor, target_ids: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Log-probs of ``target_ids`` under ``softmax(logits / temperature)``.

    logits: [B, T, V]; target_ids: [B, T] -> [B, T] (fp32)."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(dim=-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, eps_low: float = 0.2, eps_high: float = 0.28,
                      dual_clip: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, to minimise.

    ``r = exp(logp - old_logp)``; loss ``-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)``; for
    ``A < 0`` the importance weight is also truncated at ``dual_clip`` (dual-clip PPO:
    ``loss <= -dual_clip*A``), so a token the policy now favours far more than the behaviour
    did cannot blow the step up. Masked tokens give exactly 0.

    logp, old_logp, advantages, mask: [B, T] -> (per-token loss [B, T], clipped [B, T] bool)."""
    # Masked positions (padding) get ratio 1, so no inf * 0 can turn into NaN.
    ratio = torch.exp((logp - old_logp).masked_fill(mask == 0, 0.0))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * advantages
    objective = torch.minimum(unclipped, clipped)
    is_clipped = clipped < unclipped
    if dual_clip:
        floor = dual_clip * advantages
        dual = (advantages < 0) & (objective < floor)
        objective = torch.where(dual, floor, objective)
        is_clipped = is_clipped | dual
    mask = mask.to(logp.dtype)
    return -objective * mask, is_clipped & (mask > 0)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(policy || reference) per token (always >= 0):
    ``exp(ref - logp) - (ref - logp) - 1``.

    logp, ref_logp, mask: [B, T] -> [B, T] (0 where masked)."""
    diff = ref_logp - logp
    return (torch.exp(diff) - diff - 1) * mask.to(logp.dtype)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, *, eps_low: float, eps_high: float, dual_clip: float,
                ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0) -> LossTerms:
    """The trainer's loss over one micro-batch, as sums over its unmasked tokens: the
    caller divides by the token count of the whole batch (token-mean over the batch, not
    per sequence, as DAPO and Dr.GRPO do).

    logp, old_logp, advantages, mask: [B, T]; ref_logp: [B, T] or None."""
    per_token, clipped = clipped_surrogate(logp, old_logp, advantages, mask, eps_low,
                                           eps_high, dual_clip)
    loss_sum = per_token.sum()
    kl_sum = 0.0
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp, mask)
        kl_sum = kl.detach().sum().item()
        if kl_coef:
            loss_sum = loss_sum + kl_coef * kl.sum()
    fmask = mask.to(logp.dtype)
    ratio_sum = (torch.exp(logp - old_logp).detach() * fmask).sum().item()
    return LossTerms(loss_sum, clipped.sum().item(), kl_sum, ratio_sum)
