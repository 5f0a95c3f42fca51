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


SIGNALS = ("rewards", "reward-free")


@dataclass(slots=True)
class FollowConfig:
    """Online E³RL from live servers' traffic (``e3rl train follow``).

    The trainer pulls the trajectories every replica logs, turns client feedback (rewards,
    or reference answers it grades) and erasure events (the reward-free pair rule) into
    training rows, updates the model, guards the candidate (KL to the reference, entropy
    floor, optional gate set), writes a checkpoint with the per-replica cursors it covers,
    pushes the weights to every replica by upload and acknowledges what it used."""

    servers: list = _f(None, "Server base URLs to follow (http://host:port).")
    servers_file: str = _f("", "A file of server URLs, one per line (re-read every poll).")
    servers_dns: str = _f("", "HOST:PORT resolved every poll to one server per address "
                              "(a Kubernetes headless Service).")
    model: str = _f("", "The model the servers started from (its directory; safetensors).")
    reference: str = _f("", "Reference model for the KL guard (default: model).")
    state_dir: str = _f("", "The trainer's own directory: checkpoints, state.json, ledger.")
    consumer: str = _f("trainer", "Name under which this trainer acknowledges trajectories.")
    batch_size: int = _f(64, "Usable trajectories per update.")
    max_updates: int = _f(0, "Stop after this many updates (0: run until stopped).")
    dry_run: bool = _f(False, "Train and gate, but never push weights or acknowledge.")
    signals: str = _f("rewards,reward-free", "Which learning signals to use: rewards "
                                             "(client feedback), reward-free (erasure pairs).")
    settled_s: float = _f(5.0, "Pull only trajectories at least this old, so feedback sent "
                               "shortly after a response is seen with it.")
    poll_interval_s: float = _f(1.0, "Pause between polls when nothing new arrived.")
    pull_limit: int = _f(256, "Most trajectories per pull request.")
    max_staleness: int = _f(2, "Drop trajectories whose weights are more than this many "
                               "updates behind the trainer.")
    temperature: float = _f(1.0, "Only trajectories sampled at this temperature (with top_p 1, "
                                 "no top-k/min-p) are used: their logged log-probs are then "
                                 "the policy's at this temperature.")
    baseline_momentum: float = _f(0.9, "Rewards of single samples are centred on a running "
                                       "mean with this momentum (groups: their own mean).")
    segment_weights: bool = _f(True, "E3RL: spread rewarded samples' advantages over their "
                                     "segments by score.")
    segment_alpha: float = _f(0.5, "E3RL: w_k = clip(1 + alpha*max(z_k, 0), 0.5, 2).")
    pair_delta: float = _f(0.5, "E3RL pairs with a reward: delta = pair_delta * |A|.")
    lr: float = _f(1e-5, "AdamW learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.99, "AdamW beta2.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: off).")
    updates_per_batch: int = _f(1, "Optimizer updates per batch.")
    micro_batch_size: int = _f(64, "Sequences per forward/backward.")
    clip_eps_low: float = _f(0.2, "Lower clip of the importance ratio.")
    clip_eps_high: float = _f(0.28, "Upper clip of the importance ratio.")
    dual_clip: float = _f(3.0, "Truncate importance weights of negative-advantage tokens.")
    kl_coef: float = _f(0.0, "Weight of the k3 KL to the reference in the loss.")
    max_kl: float = _f(0.05, "Guard: a candidate whose mean KL to the reference on the "
                             "batch's tokens exceeds this is not pushed (0: off).")
    min_entropy_ratio: float = _f(0.5, "Guard: a candidate whose mean token entropy on the "
                                       "batch falls below this fraction of the reference's "
                                       "is not pushed (0: off).")
    gate_data: str = _f("", "Gate set: a JSONL of verifiable problems (question, "
                            "final_answer) or a built-in name; empty: no gate.")
    gate_problems: int = _f(200, "Problems of the gate set evaluated (greedy pass@1).")
    gate_margin: float = _f(0.02, "A candidate whose gate pass@1 is more than this below "
                                  "the serving model's is not pushed.")
    gate_max_tokens: int = _f(128, "Most tokens per gate completion.")
    push_timeout_s: float = _f(120.0, "Timeout of one weight upload.")
    push_retries: int = _f(3, "Attempts per replica and round before it is left for the "
                              "next round (it is retried every poll until it matches).")
    request_timeout_s: float = _f(30.0, "Timeout of pulls, acks and version checks.")
    keep_checkpoints: int = _f(3, "Accepted checkpoints kept on disk (refused ones are kept "
                                  "for inspection).")
    metrics_host: str = _f("127.0.0.1", "Bind address of the trainer's /metrics and /health.")
    metrics_port: int = _f(0, "Port of /metrics and /health (0: no HTTP server).")
    stall_timeout_s: float = _f(300.0, "/health answers 503 when the loop has not completed "
                                       "a poll for this long.")
    dtype: str = _f("float32", "Trainer weights: float32 or bfloat16.")
    device: str = _f("cpu", "Device of the trainer (cpu, cuda).")
    num_threads: int = _f(0, "torch CPU threads (0: torch's default).")
    seed: int = _f(0, "Seed of the trainer's RNG.")

    def __post_init__(self) -> None:
        self.servers = list(self.servers or [])
        if not (self.servers or self.servers_file or self.servers_dns):
            raise ValueError("name the servers to follow: --server URL (repeatable), "
                             "--servers-file FILE or --servers-dns HOST:PORT")
        for url in self.servers:
            if not str(url).startswith(("http://", "https://")):
                raise ValueError(f"server URL {url!r} must start with http:// or https://")
        if self.servers_dns and not _host_port(self.servers_dns):
            raise ValueError(f"servers_dns must be HOST:PORT, got {self.servers_dns!r}")
        if not self.model:
            raise ValueError("model is required (the directory the servers started from)")
        if not self.state_dir:
            raise ValueError("state_dir is required")
        for name in ("batch_size", "pull_limit", "updates_per_batch", "micro_batch_size",
                     "gate_problems", "gate_max_tokens", "push_retries", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_updates", "settled_s", "poll_interval_s", "max_staleness",
                     "weight_decay", "grad_clip", "kl_coef", "max_kl", "min_entropy_ratio",
                     "gate_margin", "num_threads", "segment_alpha", "pair_delta",
                     "dual_clip", "metrics_port"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("lr and temperature must be > 0")
        if not 0 <= self.baseline_momentum < 1:
            raise ValueError("baseline_momentum must be in [0, 1)")
        if self.min_entropy_ratio > 1:
            raise ValueError("min_entropy_ratio must be in [0, 1]")
        if not (self.push_timeout_s > 0 and self.request_timeout_s > 0
                and self.stall_timeout_s > 0):
            raise ValueError("timeouts must be > 0")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        unknown = set(self.signal_set()) - set(SIGNALS)
        if unknown or not self.signal_set():
            raise ValueError(f"signals must name one or more of {', '.join(SIGNALS)}, "
                             f"got {self.signals!r}")
        if not self.consumer or len(self.consumer) > 64:
            raise ValueError("consumer must be a name of 1-64 characters")

    def signal_set(self) -> set[str]:
        return {s.strip() for s in self.signals.split(",") if s.strip()}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _host_port(value: str) -> tuple[str, int] | None:
    host, _, port = value.rpartition(":")
    return (host, int(port)) if host and port.isdigit() else None
