"""The actor: turns training rows into optimizer steps (data-parallel under torchrun).

Rows are right-padded into one batch per micro-batch. The loss is the token-mean over the
whole global batch: every rank divides its sums by the global count of unmasked tokens, and
since DDP averages gradients over ranks, the local loss is multiplied by the world size. With
the same global batch, one rank and N ranks therefore take the same step (up to float
reduction order).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import RLConfig
from .credit import TrainRow
from .loss import policy_loss, token_log_probs


@dataclass(slots=True)
class Batch:
    """Right-padded tensors; column t of the ``[B, L-1]`` tensors is the prediction of
    token t+1 from the logits at position t."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    targets: torch.Tensor  # [B, L-1]
    old_logprobs: torch.Tensor  # [B, L-1]
    advantages: torch.Tensor  # [B, L-1]
    mask: torch.Tensor  # [B, L-1] float, 1 on trained output tokens


def collate(rows: list[TrainRow], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Pad ``rows`` into a `Batch` (output token k of a row with P prompt tokens sits at
    column P-1+k)."""
    length = max(len(r.prompt_ids) + len(r.output_ids) for r in rows)
    n = len(rows)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    attn = torch.zeros((n, length), dtype=torch.long)
    old = torch.zeros((n, length - 1))
    advantages = torch.zeros((n, length - 1))
    mask = torch.zeros((n, length - 1))
    for i, r in enumerate(rows):
        p, o = len(r.prompt_ids), len(r.output_ids)
        ids[i, :p + o] = torch.tensor(r.prompt_ids + r.output_ids)
        attn[i, :p + o] = 1
        old[i, p - 1:p - 1 + o] = torch.tensor(r.old_logprobs)
        advantages[i, p - 1:p - 1 + o] = torch.tensor(r.advantages, dtype=torch.float32)
        mask[i, p - 1:p - 1 + o] = torch.tensor(r.mask, dtype=torch.float32)
    to = dict(device=device)
    return Batch(ids.to(**to), attn.to(**to), ids[:, 1:].to(**to), old.to(**to),
                 advantages.to(**to), mask.to(**to))


def batch_log_probs(model: torch.nn.Module, batch: Batch, temperature: float) -> torch.Tensor:
    """Log-probs of every next token under the model at ``temperature``: [B, L-1]."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   use_cache=False).logits[:, :-1]
    return token_log_probs(logits, batch.targets, temperature)


class Actor:
    """Owns the policy (possibly DDP-wrapped), its optimizer and the optional reference."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 config: RLConfig, pad_id: int, ref_model: torch.nn.Module | None = None,
                 ddp: torch.nn.Module | None = None):
        self.model = model  # the bare module (weights, checkpoints)
        self.module = ddp if ddp is not None else model  # what forward/backward go through
        self.optimizer = optimizer
        self.config = config
        self.pad_id = pad_id
        self.ref_model = ref_model
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1

    def update(self, rows: list[TrainRow]) -> dict:
        """``updates_per_batch`` optimizer steps over ``rows``; returns the step's stats
        (loss, clip fraction, KL, ratio, grad norm, and the trainer/engine log-prob mismatch
        measured on the first forward, before any weight moves)."""
        c = self.config
        micro = [rows[i:i + c.micro_batch_size] for i in range(0, len(rows),
                                                                c.micro_batch_size)]
        counts = torch.tensor([float(sum(sum(r.mask) for r in rows)), float(len(micro))])
        if self.world_size > 1:
            dist.all_reduce(counts[:1])
            dist.all_reduce(counts[1:], op=dist.ReduceOp.MAX)
        if counts[0].item() == 0:  # nothing to learn from on any rank: no step at all
            return {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "ratio_mean": 1.0,
                    "grad_norm": 0.0, "logprob_mismatch_mean": 0.0,
                    "logprob_mismatch_max": 0.0, "num_loss_tokens": 0}
        num_tokens, num_micro = counts[0].item(), int(counts[1].item())
        # DDP needs the same number of backward passes on every rank: pad with rows whose
        # mask is all zero (they add nothing to the gradient).
        while len(micro) < num_micro:
            micro.append([TrainRow([self.pad_id], [self.pad_id], [0.0], [0.0], [0], [0])])
        scale = self.world_size / num_tokens
        totals = dict(loss=0.0, clipped=0.0, kl=0.0, ratio=0.0, grad_norm=0.0,
                      mismatch_sum=0.0, mismatch_max=0.0)
        for update in range(c.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            for k, chunk in enumerate(micro):
                batch = collate(chunk, self.pad_id, self._device())
                last = k == len(micro) - 1
                sync = contextlib.nullcontext() if last or self.module is self.model \
                    else self.module.no_sync()
                with sync:
                    logp = batch_log_probs(self.module, batch, c.temperature)
                    ref = None
                    if self.ref_model is not None:
                        with torch.no_grad():
                            ref = batch_log_probs(self.ref_model, batch, c.temperature)
                    terms = policy_loss(logp, batch.old_logprobs, batch.advantages, batch.mask,
                                        eps_low=c.clip_eps_low, eps_high=c.clip_eps_high,
                                        dual_clip=c.dual_clip, ref_logp=ref,
                                        kl_coef=c.kl_coef)
                    (terms.loss_sum * scale).backward()
                if update == 0:
                    gap = ((logp.detach() - batch.old_logprobs).abs() * batch.mask)
                    totals["mismatch_sum"] += gap.sum().item()
                    totals["mismatch_max"] = max(totals["mismatch_max"], gap.max().item())
                    totals["kl"] += terms.kl_sum
                totals["loss"] += terms.loss_sum.item() / num_tokens / c.updates_per_batch
                totals["clipped"] += terms.num_clipped / c.updates_per_batch
                totals["ratio"] += terms.ratio_sum / c.updates_per_batch
            if c.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            else:
                norm = torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in self.model.parameters() if p.grad is not None]))
            totals["grad_norm"] += norm.item() / c.updates_per_batch
            self.optimizer.step()
        local = torch.tensor([totals["loss"], totals["clipped"], totals["kl"], totals["ratio"],
                              totals["mismatch_sum"]], dtype=torch.float64)
        if self.world_size > 1:
            dist.all_reduce(local)
        loss, clipped, kl, ratio, mismatch = local.tolist()
        return {"loss": loss,
                "clip_fraction": clipped / num_tokens, "kl": kl / num_tokens,
                "ratio_mean": ratio / num_tokens, "grad_norm": totals["grad_norm"],
                "logprob_mismatch_mean": mismatch / num_tokens,
                "logprob_mismatch_max": totals["mismatch_max"],
                "num_loss_tokens": int(num_tokens)}

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device
