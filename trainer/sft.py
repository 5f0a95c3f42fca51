"""Supervised warm start: train a small character-level model on arith-chain, on CPU.

The loss is the token-mean NLL of the solution (step lines, final-answer line, EOS); the
prompt carries no loss. The run is reproducible from ``SftConfig.seed`` for a given torch
build and thread count, and stops after exactly ``num_steps`` optimizer steps.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from e3rl.engine.model_factory import build_random_model

from .arith import ArithProblem, iter_problems
from .config import SftConfig
from .loss_curve import plot_loss_curve
from .sft_data import build_arith_tokenizer, collate, token_losses

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"
CURVE_FILE = "loss_curve.png"
CONFIG_FILE = "sft_config.json"
_EVAL_SEED = 0  # the validation problems are the same for every run


@dataclass(slots=True)
class SftResult:
    """What a finished run reports."""

    out_dir: Path
    num_params: int
    final_loss: float
    final_eval: dict
    wall_s: float


def _load_model(config: SftConfig, scratch: Path) -> tuple[PreTrainedModel, object]:
    if config.init_from:
        source = Path(config.init_from)
        if not (source / "config.json").is_file():
            raise ValueError(f"init_from {source} is not a model directory (no config.json)")
    else:
        source = build_random_model(scratch / "init", config.model_config(), seed=config.seed,
                                    tokenizer=build_arith_tokenizer())
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True,
                                                 use_safetensors=True, dtype=torch.float32)
    return model, tokenizer


def _optimizer(model: PreTrainedModel, config: SftConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2))


def _save(model: PreTrainedModel, tokenizer: object, out_dir: Path) -> None:
    """Write a loadable model directory (fp32 safetensors, tokenizer, generation config)."""
    device = model.device
    model.to("cpu")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    model.to(device)


def lr_factor(step: int, config: SftConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``num_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.num_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _batches(config: SftConfig) -> Iterator[list[ArithProblem]]:
    stream = iter_problems("train", config.seed, config.task_config())
    while True:
        yield list(itertools.islice(stream, config.batch_size))


@torch.no_grad()
def evaluate_teacher_forced(model: PreTrainedModel, tokenizer: object,
                            problems: list[ArithProblem], batch_size: int = 64) -> dict:
    """Teacher-forced loss, token accuracy and exact-solution rate on ``problems``.

    ``val_seq_acc`` counts solutions whose every token is the model's argmax given the
    reference prefix: exactly the problems where greedy decoding writes the reference."""
    was_training = model.training
    model.eval()
    total_nll, num_tokens, num_right_tokens, num_exact = 0.0, 0, 0, 0
    for start in range(0, len(problems), batch_size):
        batch = {k: v.to(model.device)
                 for k, v in collate(tokenizer, problems[start:start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits  # [B, T, V]
        nll, mask = token_losses(logits, batch["labels"])  # [B, T-1]
        right = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & mask  # [B, T-1]
        total_nll += nll.sum().item()
        num_tokens += int(mask.sum())
        num_right_tokens += int(right.sum())
        num_exact += int((right.sum(1) == mask.sum(1)).sum())
    model.train(was_training)
    return {"val_loss": total_nll / num_tokens, "val_token_acc": num_right_tokens / num_tokens,
            "val_seq_acc": num_exact / len(problems)}


class _RunLog:
    """The run's records: kept in memory for the loss curve, appended to train_log.jsonl."""

    def __init__(self, path: Path):
        self.records: list[dict] = []
        self._file = path.open("w")
        self._start_s = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start_s

    def add(self, record: dict, flush: bool = False) -> None:
        record["elapsed_s"] = round(self.elapsed_s, 3)
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        if flush:
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def _train_step(model: PreTrainedModel, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, batch: dict[str, torch.Tensor],
                grad_clip: float) -> dict:
    """One optimizer step on the token-mean solution NLL; returns the step's train record."""
    logits = model(input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    nll, mask = token_losses(logits, batch["labels"])  # [B, T-1]
    loss = nll.sum() / mask.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(
        model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    return {"event": "train", "loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm),
            "num_tokens": int(mask.sum())}


def train_sft(config: SftConfig) -> SftResult:
    """Run supervised training as ``config`` says and save the model to ``config.out_dir``."""
    torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_problems = list(itertools.islice(
        iter_problems("validation", _EVAL_SEED, config.task_config(), unique=True),
        config.num_eval_problems))
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer = _load_model(config, Path(scratch))
    model.to(config.device)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("SFT: %d parameters, %d steps of %d problems, seed %d, out %s",
                num_params, config.num_steps, config.batch_size, config.seed, out_dir)
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    model.train()
    log = _RunLog(out_dir / LOG_FILE)
    try:
        bar = tqdm(range(1, config.num_steps + 1), desc="sft", disable=not config.progress)
        for step, problems in zip(bar, _batches(config)):
            batch = {k: v.to(config.device) for k, v in collate(tokenizer, problems).items()}
            record = _train_step(model, optimizer, scheduler, batch, config.grad_clip)
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"loss became {record['loss']} at step {step}")
            log.add({"step": step, **record})
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            is_last = step == config.num_steps
            if config.checkpoint_every and step % config.checkpoint_every == 0 and not is_last:
                _save(model, tokenizer, out_dir / f"checkpoint-{step}")
            if is_last or (config.eval_every and step % config.eval_every == 0):
                metrics = evaluate_teacher_forced(model, tokenizer, eval_problems)
                log.add({"event": "eval", "step": step, **metrics}, flush=True)
                logger.info("step %d: loss %.4f, val loss %.4f, val exact %.3f", step,
                            record["loss"], metrics["val_loss"], metrics["val_seq_acc"])
    finally:
        log.close()
    wall_s = log.elapsed_s
    _save(model, tokenizer, out_dir)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    plot_loss_curve(log.records, out_dir / CURVE_FILE,
                    title=f"SFT arith-chain, seed {config.seed}, {config.num_steps} steps")
    logger.info("SFT done in %.1f s; model saved to %s", wall_s, out_dir)
    train_records = [r for r in log.records if r["event"] == "train"]
    return SftResult(out_dir=out_dir, num_params=num_params,
                     final_loss=train_records[-1]["loss"], final_eval=log.records[-1],
                     wall_s=wall_s)
