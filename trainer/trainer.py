"""The RL loop: rollout -> rewards -> credit -> update -> push weights -> eval -> checkpoint.

Runs as one process, or data-parallel under ``torchrun --nproc-per-node N`` (DDP; gloo on
CPU, NCCL on GPU): every rank draws the same prompts, samples its shard with its own engine,
and the ranks agree on which groups are informative (rewards are all-gathered), so N ranks
train on the same global batch as one rank would. Rank 0 writes the log and checkpoints.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import checkpoint as ckpt
from .actor import Actor
from .config import RLConfig
from .credit import assign_credit, episode_segments, segment_limits
from .datasets import load_problems
from .evaluate import EvalSettings, evaluate_in_process
from .forks import choose_forks
from .prompts import PromptStream, apply_template
from .rewards import batch_rewards
from .rollout import Episode, sample_branches, sample_groups, stream_seed
from .run_log import RunLog

logger = logging.getLogger(__name__)

LOG_FILE = "train_log.jsonl"


@dataclass(slots=True)
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    sampled_tokens: int
    last_eval: dict


class Trainer:
    """One RL run (see the module docstring). ``run()`` trains to ``max_steps`` or the
    sampled-token budget and writes ``final/``."""

    def __init__(self, config: RLConfig):
        from e3rl.engine import LLM

        self.config = c = config
        self.rank, self.world = _init_distributed(c.device)
        self.device = _rank_device(c.device, self.rank)
        self.out = Path(c.output_dir)
        if self.rank == 0:
            if not c.resume and (self.out / LOG_FILE).exists():
                raise ValueError(f"{self.out} already holds a run ({LOG_FILE}): pass --resume "
                                 "to continue it, or choose another output dir")
            self.out.mkdir(parents=True, exist_ok=True)
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        resume_dir = ckpt.latest(self.out) if c.resume else None
        if c.resume and resume_dir is None:
            logger.info("--resume: no checkpoint in %s yet, starting from %s", self.out, c.model)
        self.tokenizer, self.model = _load(str(resume_dir or c.model), c.dtype, self.device)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr,
                                           betas=(c.adam_beta1, c.adam_beta2),
                                           weight_decay=c.weight_decay)
        self.step, self.sampled_tokens, self.kept_tokens, position = 0, 0, 0, 0
        self.parent = str(c.model)
        if resume_dir is not None:
            position = self._restore(resume_dir)
        ref = None
        if c.kl_coef > 0:
            ref = _load(c.model, c.dtype, self.device)[1].eval().requires_grad_(False)
        ddp = None
        if self.world > 1:
            ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=None if c.device == "cpu" else [self.device])
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id or 0
        self.actor = Actor(self.model, self.optimizer, c, pad_id, ref, ddp)
        self.llm = LLM(c.model, dtype=c.dtype, device=str(self.device), seed=c.seed,
                       kv_cache_memory_gb=c.kv_cache_memory_gb,
                       num_threads=c.num_threads or None)
        self._push_weights()
        self.boundary_ids = _boundary_ids(self.tokenizer, c.healing_options())
        self.segment_limits = segment_limits(c)
        self.prompts = PromptStream(c.dataset, c.seed, position, c.arith_config(),
                                    c.prompt_template)
        self.eval_problems = apply_template(
            load_problems(c.eval_data, limit=c.eval_problems, arith_config=c.arith_config()),
            c.prompt_template)
        self.log = RunLog(self.out / LOG_FILE, after_step=self.step) if self.rank == 0 else None
        self.last_eval: dict = {}

    def _restore(self, resume_dir: Path) -> int:
        """Optimizer, RNG streams and counters from a checkpoint; returns the data position."""
        state = ckpt.load_state(resume_dir)
        ckpt.restore_optimizer(self.model, self.optimizer, state.optimizer,
                               state.meta["param_groups"])
        ckpt.restore_rng(state.rng, state.meta)
        self.step = state.step
        self.sampled_tokens = state.meta["sampled_tokens"]
        self.kept_tokens = state.meta["kept_tokens"]
        self.parent = state.meta["version"]
        logger.info("resumed from %s (step %d, %d sampled tokens)", resume_dir, self.step,
                    self.sampled_tokens)
        return state.meta["data_position"]

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> TrainResult:
        c = self.config
        bar = tqdm(total=c.max_steps, initial=self.step, desc=f"{c.algo}",
                   disable=not c.progress or self.rank != 0)
        while self.step < c.max_steps:
            if c.max_sampled_tokens and self.sampled_tokens >= c.max_sampled_tokens:
                logger.info("sampled-token budget reached (%d)", self.sampled_tokens)
                break
            record = self.train_step()
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.3f}",
                            groups=record["informative_groups"])
            due = c.eval_every and self.step % c.eval_every == 0
            if due or self.step == c.max_steps:
                self.evaluate()
            if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                self.save(ckpt.step_dir(self.out, self.step))
        bar.close()
        if not self.last_eval or self.last_eval.get("step") != self.step:
            self.evaluate()
        final = self.save(self.out / "final")
        if self.rank == 0:
            logger.info("final model: %s (step %d, %d sampled tokens)", final, self.step,
                        self.sampled_tokens)
        return TrainResult(self.out, final, self.step, self.sampled_tokens, self.last_eval)

    def train_step(self) -> dict:
        c = self.config
        t0 = time.perf_counter()
        self.step += 1
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * min(1.0, self.step / c.warmup_steps) if c.warmup_steps else c.lr
        kept, dropped, info = self._collect_groups()
        sampled = [e for g in kept + dropped for e in g]  # before forks move groups over
        num_collected = len(kept)
        branches, num_forks, num_informative_forks = {}, 0, 0
        if c.erasure_learning == "fork":
            branches, kept, drawn, num_forks, num_informative_forks = self._fork(kept, dropped)
            sampled += drawn  # every branch drawn, trained on or not
        t1 = time.perf_counter()
        rows, credit = assign_credit(kept, branches, c, self.boundary_ids, self.step - 1)
        stats = self.actor.update(rows)
        t2 = time.perf_counter()
        self._push_weights()
        t3 = time.perf_counter()
        # Sampled = every token the engine drew (erased attempts included); kept = the
        # tokens of the returned outputs.
        totals = self._all_sum([sum(e.num_computed_tokens for e in sampled),
                                sum(len(e.output_ids) for e in sampled),
                                sum(len(e.erasures) for e in sampled),
                                info["num_segments"], sum(sum(e.entropy) for e in sampled),
                                credit.num_stale_tokens, num_forks, num_informative_forks])
        tokens, kept_tokens, erasures, segments, entropy, stale, forks, useful = totals
        self.sampled_tokens += int(tokens)
        self.kept_tokens += int(kept_tokens)
        record = {"event": "train", "step": self.step, "weight_version": self.step,
                  "sampled_tokens": self.sampled_tokens, "kept_tokens": self.kept_tokens,
                  "reward": info["reward"], "informative_groups": info["informative"],
                  "groups_sampled": info["sampled"], "num_forks": int(forks),
                  "rescued_groups": len(kept) - num_collected,
                  "informative_forks": int(useful), "entropy": entropy / max(kept_tokens, 1),
                  "erasure_rate": erasures / max(segments, 1), "stale_tokens": int(stale),
                  "pair_rows": credit.num_pair_rows, "branch_rows": credit.num_branch_rows,
                  "segment_weight_max": credit.segment_weight_max,
                  "lr": self.optimizer.param_groups[0]["lr"], **stats,
                  "time_rollout_s": t1 - t0, "time_train_s": t2 - t1, "time_push_s": t3 - t2,
                  "time_step_s": t3 - t0}
        if self.log is not None:
            self.log.write(record)
        return record

    def _collect_groups(self) -> tuple[list[list[Episode]], list[list[Episode]], dict]:
        """Sample groups until ``prompts_per_step`` informative ones are in (dynamic
        sampling), or the refill rounds are spent. All ranks decide alike."""
        c = self.config
        kept, dropped, rewards_seen, num_kept, num_sampled, num_segments = [], [], [], 0, 0, 0
        for _ in range(1 + (c.max_refill_rounds if c.dynamic_sampling else 0)):
            need = c.prompts_per_step - num_kept
            first = self.prompts.position
            problems = self.prompts.take(need)
            mine = list(range(self.rank, need, self.world))
            groups = sample_groups(
                self.llm, [problems[i] for i in mine], c.group_size,
                temperature=c.temperature, max_tokens=c.max_tokens,
                seeds=[stream_seed(c.seed, self.step, "group", first + i) for i in mine],
                group_ids=[first + i for i in mine],
                healing=c.healing_options() if c.heal_rollouts else None)
            for group in groups:
                rewards = batch_rewards([ep.problem for ep in group], [ep.text for ep in group])
                for episode, r in zip(group, rewards):
                    episode.reward = r
                num_segments += sum(len(self._segments(e)) for e in group)
            local = {first + i: [e.reward for e in g] for i, g in zip(mine, groups)}
            everything = self._all_gather(local)
            num_sampled += need
            for gid in sorted(everything):
                rewards_seen += everything[gid]
                informative = len(set(everything[gid])) > 1
                num_kept += informative or not c.dynamic_sampling
            for g in groups:
                informative = len({e.reward for e in g}) > 1
                (kept if informative or not c.dynamic_sampling else dropped).append(g)
            if num_kept >= c.prompts_per_step:
                break
        info = {"reward": sum(rewards_seen) / max(len(rewards_seen), 1),
                "informative": num_kept, "sampled": num_sampled, "num_segments": num_segments}
        return kept, dropped, info

    def _fork(self, kept: list[list[Episode]], dropped: list[list[Episode]]):
        """E3RL's fork rule: branch at uncertain segments, finish and grade the branches.
        A dropped (all-equal) group whose fork disagrees joins the batch. Returns the
        branches keyed by episode index in the final kept list, that list, every branch
        drawn (for the token count), the number of forks and of informative forks."""
        c = self.config
        episodes = [e for g in kept + dropped for e in g]
        budget = max(1, c.fork_max_per_step // self.world)
        chosen = choose_forks([self._segments(e) for e in episodes], c.fork_quantile, budget)
        if not chosen:
            return {}, kept, [], 0, 0
        parents = [episodes[i] for i, _ in chosen]
        found = sample_branches(
            self.llm, parents, [pos for _, pos in chosen], c.fork_branches,
            temperature=c.temperature, max_tokens=c.max_tokens,
            seeds=[stream_seed(c.seed, self.step, "fork", p.group * c.group_size + p.index)
                   for p in parents])
        for per in found:
            for b, r in zip(per, batch_rewards([b.problem for b in per], [b.text for b in per])):
                b.reward = r
        useful = {id(p) for p, per in zip(parents, found)
                  if len({p.reward} | {b.reward for b in per}) > 1}
        final = kept + [g for g in dropped if any(id(e) in useful for e in g)]
        index = {id(e): k for k, e in enumerate(e for g in final for e in g)}
        branches = {index[id(p)]: per for p, per in zip(parents, found) if id(p) in index}
        drawn = [b for per in found for b in per]
        return branches, final, drawn, len(chosen), len(useful)

    def _segments(self, episode: Episode) -> list[tuple[int, int, float]]:
        spans, scores = episode_segments(episode, self.boundary_ids, self.segment_limits)
        return [(a, b, s) for (a, b), s in zip(spans, scores)]

    # -- weights, eval, checkpoints ------------------------------------------------------
    def _push_weights(self) -> None:
        """The trainer's weights into the rollout engine, as version ``step``."""
        self.llm.update_weights(self.model.state_dict(), str(self.step))

    def evaluate(self) -> dict:
        """Greedy and sampled pass@1 on the held-out problems (rank 0; same sampling seeds
        for every run, so arms compare on equal draws)."""
        c = self.config
        result = {"event": "eval", "step": self.step, "sampled_tokens": self.sampled_tokens}
        if self.rank == 0:
            for name, temperature in (("greedy", 0.0), ("sampled", c.temperature)):
                settings = EvalSettings(n=1, temperature=temperature, seed=0,
                                        max_tokens=c.max_tokens)
                report = evaluate_in_process(self.llm, self.eval_problems, settings,
                                             analyze_steps=False).report()
                result[f"{name}_pass@1"] = report["pass@1"]
            result["num_problems"] = len(self.eval_problems)
            self.log.write(result)
            logger.info("step %d: greedy pass@1 %.3f, sampled %.3f (%d sampled tokens)",
                        self.step, result["greedy_pass@1"], result["sampled_pass@1"],
                        self.sampled_tokens)
        self._barrier()
        self.last_eval = result
        return result

    def save(self, path: Path) -> Path:
        """A checkpoint of the current step (rank 0 writes; the others wait)."""
        if self.rank == 0:
            metrics = {k: v for k, v in self.last_eval.items() if k.endswith("pass@1")}
            meta = {"version": str(self.step), "step": self.step, "parent": self.parent,
                    "algo": self.config.algo, "config": self.config.to_dict(),
                    "metrics": metrics, "data_position": self.prompts.position,
                    "sampled_tokens": self.sampled_tokens,
                    "kept_tokens": self.kept_tokens}
            ckpt.save_checkpoint(path, self.model, self.tokenizer, self.optimizer,
                                 source_model=self.config.model, meta=meta)
            self.parent = str(self.step)
            logger.info("checkpoint %s (version %d)", path, self.step)
        self._barrier()
        return path

    # -- distributed helpers -------------------------------------------------------------
    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def _all_gather(self, local: dict) -> dict:
        if self.world == 1:
            return dict(local)
        parts: list = [None] * self.world
        dist.all_gather_object(parts, local)
        merged: dict = {}
        for part in parts:
            merged.update(part)
        return merged

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size): from torchrun's environment when launched by it, else (0, 1)."""
    if not dist.is_torchelastic_launched():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo" if device == "cpu" else "nccl")
    return dist.get_rank(), dist.get_world_size()


def _load(source: str, dtype: str, device: torch.device):
    """(tokenizer, model) of a local model directory (safetensors; no remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True,
                                                 use_safetensors=True, dtype=getattr(torch, dtype))
    return tokenizer, model.to(device)


def _boundary_ids(tokenizer, healing: dict) -> frozenset[int]:
    """Token ids whose text contains a segment boundary (newline by default)."""
    boundary = healing.get("segment_boundary", ["\n"])
    boundary = [boundary] if isinstance(boundary, str) else boundary
    return frozenset(i for i in range(len(tokenizer))
                     if any(b in tokenizer.decode([i]) for b in boundary))


def _rank_device(device: str, rank: int) -> torch.device:
    """``cuda`` under torchrun means this rank's own GPU (one GPU per rank)."""
    if device == "cuda" and dist.is_initialized():
        local = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(local)
        return local
    return torch.device(device)


def train_rl(config: RLConfig) -> TrainResult:
    """Run one RL training (the ``e3rl train rl`` command)."""
    return Trainer(config).run()
