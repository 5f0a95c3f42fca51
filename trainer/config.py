"""Trainer configurations. Every field carries help text (the CLI shows it as ``--help``)."""

from __future__ import annotations

import dataclasses
import json
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


ALGOS = ("grpo", "e3rl")
ERASURE_RULES = ("off", "pairs", "fork")
SEGMENT_WEIGHT_MODES = ("all", "negative")
# What ``algo="e3rl"`` switches on when a component is left unset (None): segment weights
# and fork learning on plain rollouts (DESIGN's directions after the probe). On the
# validation split no one-component change beat it beyond noise, and it ends level with
# GRPO (README, "Training"); ``algo="grpo"`` switches every component off.
E3RL_DEFAULTS = {"heal_rollouts": False, "segment_weights": True, "erasure_learning": "fork"}


@dataclass(slots=True)
class RLConfig:
    """Reinforcement learning on verifiable problems: GRPO, or E³RL (GRPO plus the
    components that learn from the engine's erasures, each behind its own switch).

    Rollouts run through the in-process e3rl engine; after every update the new weights go
    into it (``update_weights``), so every rollout is on-policy up to ``max_staleness``."""

    model: str = _f("", "Model directory to start from (safetensors; a trainer checkpoint "
                        "works too).")
    output_dir: str = _f("", "Where train_log.jsonl, checkpoints/ and final/ go.")
    algo: str = _f("grpo", "grpo (every E3RL component off) or e3rl (components default to "
                           "the shipped design; each switch below overrides one).")
    dataset: str = _f("arith-chain", "arith-chain (built-in, train split) or a local "
                                     "JSONL/Parquet file with question/final_answer columns.")
    prompt_template: str = _f("{question}", "How a non-arith question becomes a prompt "
                                            "(a chat template with {question}, e.g. asking "
                                            "for a \\boxed{} answer); arith-chain prompts "
                                            "keep the task's format.")
    arith_min_steps: int = _f(2, "arith-chain: fewest steps per problem (train and built-in "
                                 "eval data; 5 with max 5 is the harder setting).")
    arith_max_steps: int = _f(MAX_TRAIN_STEPS, "arith-chain: most steps per problem.")
    eval_data: str = _f("arith-chain:validation", "Held-out problems for the periodic eval "
                                                  "(built-in name or file). Keep the test "
                                                  "split for the final table.")
    max_steps: int = _f(100, "Optimizer rounds (rollout + updates) to run.")
    max_sampled_tokens: int = _f(0, "Stop once this many tokens were sampled (0: no budget).")
    seed: int = _f(0, "Seed of the prompt order, the sampling streams and the trainer's RNG.")
    group_size: int = _f(8, "Samples per prompt (G); advantages are relative to the group.")
    prompts_per_step: int = _f(16, "Informative groups (prompts) per optimizer round.")
    dynamic_sampling: bool = _f(True, "Drop groups whose rewards are all equal and refill "
                                      "with new prompts (DAPO's dynamic sampling).")
    max_refill_rounds: int = _f(4, "Most refill rounds per step before training on fewer "
                                    "groups.")
    temperature: float = _f(1.0, "Sampling temperature of rollouts (the loss uses the same).")
    max_tokens: int = _f(128, "Most tokens per completion.")
    lr: float = _f(1e-4, "AdamW learning rate (constant after warm-up).")
    warmup_steps: int = _f(0, "Linear learning-rate warm-up, in optimizer rounds.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.99, "AdamW beta2.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: off).")
    updates_per_batch: int = _f(1, "Optimizer updates per rollout batch (>1 re-uses the "
                                     "batch off-policy, corrected by the clipped ratio).")
    micro_batch_size: int = _f(64, "Sequences per forward/backward (gradient accumulation).")
    clip_eps_low: float = _f(0.2, "Lower clip of the importance ratio (1 - eps).")
    clip_eps_high: float = _f(0.28, "Upper clip of the importance ratio (1 + eps, DAPO).")
    dual_clip: float = _f(3.0, "Truncate importance weights of negative-advantage tokens at "
                               "this (dual-clip PPO; 0: off).")
    kl_coef: float = _f(0.0, "Weight of the k3 KL estimate to the reference (start) model "
                             "(0: no reference forward).")
    max_staleness: int = _f(0, "Tokens sampled by weights more than this many versions "
                               "behind the trainer are masked and counted.")
    # E3RL components (None: the algo's default).
    heal_rollouts: bool | None = _f(None, "E3RL: self-healing decoding during rollouts.")
    healing: str = _f("{}", "E3RL: healing options (JSON) for healed rollouts.")
    segment_weights: bool | None = _f(None, "E3RL: allocate each sample's advantage over its "
                                            "segments by segment score.")
    segment_alpha: float = _f(0.5, "E3RL: w_k = clip(1 + alpha*max(z_k, 0), 0.5, 2).")
    segment_weight_mode: str = _f("all", "E3RL: all (every sample) or negative (only samples "
                                         "with a negative advantage).")
    erasure_learning: str | None = _f(None, "E3RL: off, pairs (erased attempt vs its "
                                            "replacement; needs healed rollouts) or fork "
                                            "(branch at uncertain segments, finish the "
                                            "branches, local advantages).")
    pair_delta: float = _f(0.5, "E3RL pairs: delta = pair_delta * |A_i|.")
    reward_free_pairs: bool = _f(False, "E3RL pairs: ignore rewards, prefer the segment with "
                                        "the lower score (served traffic's rule).")
    fork_branches: int = _f(2, "E3RL fork: new branches sampled at each fork point.")
    fork_quantile: float = _f(0.9, "E3RL fork: a segment is uncertain above this quantile of "
                                   "the step's segment scores (follows the policy).")
    fork_max_per_step: int = _f(16, "E3RL fork: most fork points per step.")
    # Evaluation, checkpoints, logging.
    eval_every: int = _f(20, "Evaluate greedy and sampled pass@1 every this many steps "
                             "(0: only at the end).")
    eval_problems: int = _f(200, "Problems of eval_data per evaluation.")
    checkpoint_every: int = _f(50, "Write a checkpoint every this many steps (0: only final).")
    resume: bool = _f(False, "Continue from the newest checkpoint in output_dir.")
    dtype: str = _f("float32", "Weights of the trainer and its rollout engine: float32 or "
                               "bfloat16 (GPU recipes).")
    kv_cache_memory_gb: float = _f(0.5, "KV cache budget of the rollout engine.")
    num_threads: int = _f(0, "torch CPU threads (0: torch's default).")
    device: str = _f("cpu", "Device of the trainer and its rollout engine (cpu, cuda).")
    progress: bool = _f(True, "Show a progress bar.")

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required (a model directory)")
        if not self.output_dir:
            raise ValueError("output_dir is required")
        if self.algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        for name in ("max_steps", "group_size", "prompts_per_step", "max_tokens",
                     "updates_per_batch", "micro_batch_size", "eval_problems",
                     "fork_branches", "fork_max_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_sampled_tokens", "max_refill_rounds", "warmup_steps", "weight_decay",
                     "grad_clip", "kl_coef", "max_staleness", "eval_every",
                     "checkpoint_every", "num_threads", "segment_alpha", "pair_delta",
                     "dual_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2: a group-relative advantage needs "
                             "at least two samples")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("lr and temperature must be > 0 (rollouts sample; greedy "
                             "rollouts have no behaviour distribution)")
        if not (0 <= self.clip_eps_low < 1 and self.clip_eps_high >= 0):
            raise ValueError("need 0 <= clip_eps_low < 1 and clip_eps_high >= 0")
        if self.dual_clip and self.dual_clip <= 1:
            raise ValueError("dual_clip must be > 1 (or 0 for off)")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("adam betas must be in [0, 1)")
        if not 0 < self.fork_quantile < 1:
            raise ValueError("fork_quantile must be in (0, 1)")
        if self.segment_weight_mode not in SEGMENT_WEIGHT_MODES:
            raise ValueError(f"segment_weight_mode must be one of "
                             f"{', '.join(SEGMENT_WEIGHT_MODES)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        self._resolve_components()
        if self.erasure_learning not in ERASURE_RULES:
            raise ValueError(f"erasure_learning must be one of {', '.join(ERASURE_RULES)}, "
                             f"got {self.erasure_learning!r}")
        if self.erasure_learning == "pairs" and not self.heal_rollouts:
            raise ValueError("erasure_learning=pairs learns from erasure events, which only "
                             "healed rollouts produce: set heal_rollouts (or use fork)")
        self.healing_options()  # validates the JSON
        if "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {question}")
        self.arith_config()  # validates the task knobs

    def arith_config(self) -> ArithConfig:
        """The arith-chain generator knobs of the training stream and built-in eval data."""
        task = ArithConfig(min_steps=self.arith_min_steps, max_steps=self.arith_max_steps)
        task.check_split("train")
        return task

    def _resolve_components(self) -> None:
        """Fill unset E3RL switches from the algo; GRPO refuses any switched-on component."""
        for name, default in E3RL_DEFAULTS.items():
            value = getattr(self, name)
            if self.algo == "grpo":
                off = False if isinstance(default, bool) else "off"
                if value not in (None, off):
                    raise ValueError(f"algo=grpo runs with every E3RL component off, but "
                                     f"{name}={value!r}: use algo=e3rl for ablations")
                setattr(self, name, off)
            elif value is None:
                setattr(self, name, default)

    def healing_options(self) -> dict:
        """The healing options for healed rollouts, as a dict (validated JSON)."""
        try:
            options = json.loads(self.healing) if isinstance(self.healing, str) else self.healing
        except json.JSONDecodeError as exc:
            raise ValueError(f"healing is not valid JSON: {exc.msg}") from exc
        if not isinstance(options, dict):
            raise ValueError("healing must be a JSON object of healing options")
        return {**options, "enabled": True}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
