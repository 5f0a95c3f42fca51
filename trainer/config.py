"""Trainer configurations. Every field carries help text (the CLI shows it as ``--help``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .arith import MAX_TRAIN_STEPS, OPERATORS, ArithConfig


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    return field(default=default, metadata={"help": help})


@dataclass(slots=True)
class SftConfig:
    """Supervised warm start of a small character-level model on arith-chain.

    The run is a pure function of this config: the data stream, the initial weights and
    the batch order all come from ``seed``, and it stops after exactly ``num_steps``
    optimizer steps (the window where the model is good but imperfect is narrow, so a run
    must not stop by time)."""

    out_dir: str = _f("", "Directory to write the trained model (safetensors, tokenizer, "
                          "train_log.jsonl, loss_curve.png, sft_config.json).")
    seed: int = _f(0, "Seed of the initial weights, the training problems and their order.")
    num_steps: int = _f(1125, "Number of optimizer steps; the run stops here (1125: the "
                                "bundled models/arith-chain).")
    batch_size: int = _f(64, "Problems per optimizer step.")
    lr: float = _f(1e-3, "Peak learning rate, reached after warm-up.")
    min_lr_ratio: float = _f(1.0, "Final learning rate as a fraction of lr, reached by cosine "
                                  "decay at num_steps. 1.0 (default) keeps lr constant after "
                                  "warm-up, so a run of N steps is exactly the first N steps "
                                  "of any longer run with the same seed.")
    warmup_steps: int = _f(50, "Linear warm-up steps from 0 to lr.")
    weight_decay: float = _f(0.05, "AdamW weight decay (not applied to norms and biases).")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.98, "AdamW beta2.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: off).")
    # Model (a Llama or Qwen3 built by e3rl.engine.model_factory with random weights).
    init_from: str = _f("", "Start from this model directory instead of random weights "
                            "(its tokenizer is kept; the model_* fields are ignored).")
    model_type: str = _f("llama", "Architecture: llama or qwen3.")
    hidden_size: int = _f(256, "Hidden size.")
    num_layers: int = _f(4, "Number of transformer layers.")
    num_heads: int = _f(4, "Attention heads (as many key/value heads).")
    intermediate_size: int = _f(512, "MLP inner size.")
    max_position_embeddings: int = _f(512, "Longest sequence the model accepts.")
    tie_word_embeddings: bool = _f(True, "Share input and output embeddings.")
    # Task knobs (see e3rl.trainer.arith.ArithConfig); the train split is always used.
    min_steps: int = _f(2, "Fewest steps per training problem.")
    max_steps: int = _f(MAX_TRAIN_STEPS, f"Most steps per training problem (<= {MAX_TRAIN_STEPS}).")
    digits: int = _f(2, "Digits of every +/- operand.")
    operators: str = _f("+-", f"Operators to draw from (subset of {OPERATORS!r}).")
    # Monitoring.
    eval_every: int = _f(100, "Every this many steps, log teacher-forced loss and accuracy on "
                              "the validation split (0: only at the end).")
    num_eval_problems: int = _f(256, "Validation problems for that check.")
    checkpoint_every: int = _f(0, "Every this many steps, also save the model to "
                                  "out_dir/checkpoint-STEP (0: only the final model).")
    num_threads: int = _f(1, "torch CPU threads (keep it low on a shared machine).")
    device: str = _f("cpu", "Device to train on (cpu; cuda works too, but the bundled model "
                            "is defined by a CPU run: other devices give other numbers).")
    progress: bool = _f(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        positive = ("num_steps", "batch_size", "hidden_size", "num_layers", "num_heads",
                    "intermediate_size", "max_position_embeddings", "num_threads",
                    "num_eval_problems")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.out_dir:
            raise ValueError("out_dir is required")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("need lr > 0 and 0 <= min_lr_ratio <= 1")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("need weight_decay >= 0 and adam betas in [0, 1)")
        if self.model_type not in ("llama", "qwen3"):
            raise ValueError(f"model_type must be llama or qwen3, got {self.model_type!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_heads {self.num_heads}")
        self.task_config()  # validates the task knobs for the train split

    def task_config(self) -> ArithConfig:
        """The generator knobs, checked against the train split."""
        task = ArithConfig(min_steps=self.min_steps, max_steps=self.max_steps,
                           digits=self.digits, operators=self.operators)
        task.check_split("train")
        return task

    def model_config(self) -> dict:
        """The transformers config dict handed to ``build_random_model``."""
        fields = dict(model_type=self.model_type, hidden_size=self.hidden_size,
                      intermediate_size=self.intermediate_size,
                      num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                      num_key_value_heads=self.num_heads,
                      max_position_embeddings=self.max_position_embeddings,
                      tie_word_embeddings=self.tie_word_embeddings)
        if self.model_type == "qwen3":
            fields["head_dim"] = self.hidden_size // self.num_heads
        return fields

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
