"""RL baseline: e3rl's GRPO (``e3rl train rl``) against Hugging Face TRL's ``GRPOTrainer``,
same model, task and settings, in one run.

Both train the bundled ``models/arith-chain`` (2.63M-parameter Llama, fp32, CPU) on the
arith-chain train split with the reward 1.0 if ``grade_arith(completion, final_answer)``
else 0.0, and the same GRPO settings: G=8 samples per prompt, 16 prompts per step (128
completions), temperature 1.0, top-p 1, at most 128 completion tokens, AdamW lr 1e-5
constant (betas 0.9/0.99, no weight decay), gradient clip 1.0, one update per batch
(on-policy: the importance ratio is 1, so neither the clip range 0.2/0.28 nor e3rl's dual
clip acts), no KL term, group-relative advantages without std division (Dr.GRPO), loss
averaged over every completion token of the batch (TRL's ``loss_type="dapo"``; TRL's
``"dr_grpo"`` divides by completions x ``max_completion_length`` instead of the real token
count, which e3rl does not do), micro-batches of 64 sequences, no dynamic sampling.

TRL runs in its own virtual environment (``.venv-trl``: see benchmarks/README.md for how it
is built): this script, started from the main venv, re-runs itself there with
``--_trl-worker``. TRL generates with plain transformers ``generate`` (no vLLM).

Figures per system: seconds per optimizer step (median, the first step left out as a
warm-up), split into rollout (generate, reward, advantages) and update (forward, backward,
optimizer step; e3rl's also holds its weight push into the engine), CPU seconds per step,
sampled completion tokens per second (every generated token including EOS, summed over the
steps after the first, over those steps' wall time), total sampled tokens, and greedy pass@1
on arith-chain test problems (``e3rl eval ... --temperature 0``, the e3rl engine, main venv)
of the starting model and of each trained model. The prompts are the same for both: the
train split's stream ``iter_problems("train", seed)`` in order. Per-step figures land in
OUTPUT_DIR/summary.json.

Equal sampled tokens: e3rl runs until its cumulative sampled tokens reach TRL's total
(``--max-sampled-tokens``, when ``e3rl train rl`` has it; at most 4x ``--steps`` steps), so
its final model is compared with TRL's after the same sampling work, overshooting by less
than one step's tokens (the figure is printed). Without that flag it runs ``--steps`` steps
and the table says the totals differ.

    .venv/bin/python benchmarks/rl.py [--steps 20] [--eval-problems 500] [--num-threads N]
        [--trl-only | --e3rl-only] [--output-dir DIR]

``--e3rl-only`` takes TRL's sampled-token total from OUTPUT_DIR/trl/result.json when an
earlier run left one there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "arith-chain"
TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
E3RL_CLI = ROOT / ".venv" / "bin" / "e3rl"

GROUP_SIZE = 8
PROMPTS_PER_STEP = 16
TEMPERATURE = 1.0
MAX_TOKENS = 128
LR = 1e-5
MICRO_BATCH = 64  # sequences per forward/backward (e3rl's micro_batch_size default)


# ----------------------------------------------------------------------------- TRL worker
# Runs inside .venv-trl: imports nothing from benchmarks/common.py (httpx and the engine are
# not installed there), only e3rl's pure-Python task code.

def trl_config(args: argparse.Namespace):
    """GRPOConfig with e3rl's GRPO settings (see the module docstring)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(Path(args.output_dir) / "trainer"),
        max_steps=args.steps,
        seed=args.seed,
        # 128 completions per generation, two micro-batches of 64, one optimizer step.
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=GROUP_SIZE * PROMPTS_PER_STEP // MICRO_BATCH,
        num_generations=GROUP_SIZE, num_iterations=1,
        max_completion_length=MAX_TOKENS, temperature=TEMPERATURE, top_p=1.0, top_k=0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="none",
        mask_truncated_completions=False,
        shuffle_dataset=False,  # prompts in e3rl's order (its PromptStream's)
        use_vllm=False, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0,
    )


def trl_worker(args: argparse.Namespace) -> None:
    """Train with TRL, save the model to OUTPUT_DIR/final, the figures to result.json."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from e3rl.trainer.arith import format_prompt, iter_problems
    from e3rl.trainer.grading import grade_arith

    out = Path(args.output_dir)
    # The prompt stream of e3rl's trainer (``iter_problems("train", seed)``, in order).
    problems = itertools.islice(iter_problems("train", args.seed), args.steps * PROMPTS_PER_STEP)
    dataset = Dataset.from_list([{"prompt": format_prompt(p.question),
                                  "final_answer": str(p.answer)} for p in problems])
    sampled_tokens: list[int] = []  # per step: every generated token, EOS included
    mean_rewards: list[float] = []
    step_ends: list[tuple[float, float]] = []  # (wall, this process's CPU) after each step
    rollout_s: list[float] = []

    def arith_reward(prompts, completions, completion_ids, final_answer, **_):
        # Called once per generation batch (= one optimizer step here).
        sampled_tokens.append(sum(len(ids) for ids in completion_ids))
        rewards = [1.0 if grade_arith(c, a) else 0.0 for c, a in zip(completions, final_answer)]
        mean_rewards.append(sum(rewards) / len(rewards))
        return rewards

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            step_ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *_, **__):
            step_ends.append((time.perf_counter(), time.process_time()))

    class TimedGRPOTrainer(GRPOTrainer):
        """Times the rollout phase (generate + reward + advantages), as e3rl's log does."""

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            batch = super()._generate_and_score_completions(inputs)
            rollout_s.append(time.perf_counter() - t0)
            return batch

    config = trl_config(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True,
                                                 dtype=torch.float32, local_files_only=True)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=arith_reward, args=config,
                               train_dataset=dataset, processing_class=tokenizer,
                               callbacks=[StepTimer()])
    trainer.train()
    trainer.save_model(str(out / "final"))  # safetensors + tokenizer
    result = {"steps": len(step_ends) - 1, "sampled_tokens": sampled_tokens,
              "step_s": [b[0] - a[0] for a, b in zip(step_ends, step_ends[1:])],
              "cpu_s": [b[1] - a[1] for a, b in zip(step_ends, step_ends[1:])],
              "rollout_s": rollout_s, "mean_reward": mean_rewards,
              "torch_threads": torch.get_num_threads(),
              "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__},
              "config": {k: getattr(config, k) for k in (
                  "per_device_train_batch_size", "gradient_accumulation_steps",
                  "generation_batch_size", "steps_per_generation", "num_generations",
                  "max_completion_length", "temperature", "top_p", "top_k", "learning_rate",
                  "beta", "epsilon", "epsilon_high", "loss_type", "scale_rewards",
                  "num_iterations", "max_grad_norm", "adam_beta1", "adam_beta2")}}
    (out / "result.json").write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------- main venv

def child_load_monitor():
    """``common.LoadMonitor`` that also counts CPU of this process's finished children (the
    trainers run as subprocesses and are waited for, so their time lands in ``os.times()``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import LoadMonitor

    class ChildLoadMonitor(LoadMonitor):
        def _ours(self) -> float:
            t = os.times()
            return t.user + t.system + t.children_user + t.children_system

    return ChildLoadMonitor()


def run_logged(cmd: list[str], log: Path, on_poll=None) -> None:
    """Run ``cmd``, its output to ``log``; raise with the log's tail if it fails. While it
    runs, ``on_poll(process)`` is called every 50 ms."""
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        while proc.poll() is None:
            if on_poll is not None:
                on_poll(proc)
            time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         f"{log.read_text()[-3000:]}")


def greedy_pass1(model_dir: Path, report: Path, args: argparse.Namespace) -> float:
    """Greedy pass@1 of ``model_dir`` on the first ``--eval-problems`` test problems."""
    run_logged([str(E3RL_CLI), "eval", "--model", str(model_dir), "--data", "arith-chain:test",
                "--limit", str(args.eval_problems), "--temperature", "0", "--report",
                str(report)], report.with_suffix(".log"))
    return json.loads(report.read_text())["pass@1"]


def summarize(step_s: list[float], tokens: list[int], cpu_s: list[float],
              rollout_s: list[float]) -> dict:
    """Per-step figures -> the table's; step 1 is a warm-up (first-call costs: kernel builds,
    allocator, lazy imports; its CPU figure also holds the process start) and is left out.

    CPU seconds per step (the trainer process, all threads) matter on this shared machine:
    wall time moves several-fold with the neighbours' load, CPU time much less."""
    def median_after_first(values):
        return statistics.median(values[1:] or values) if values else None

    timed_s, timed_tokens = step_s[1:] or step_s, tokens[1:] or tokens
    train_s = [a - b for a, b in zip(step_s, rollout_s)] if rollout_s else []
    return {"steps": len(step_s), "s_per_step": median_after_first(step_s),
            "cpu_s_per_step": median_after_first(cpu_s),
            "rollout_s_per_step": median_after_first(rollout_s),
            "train_s_per_step": median_after_first(train_s),
            "tokens_per_s": sum(timed_tokens) / sum(timed_s),
            "total_sampled_tokens": sum(tokens), "train_wall_s": sum(step_s),
            "per_step": {"wall_s": step_s, "rollout_s": rollout_s, "cpu_s": cpu_s,
                         "sampled_tokens": tokens}}


def run_trl(args: argparse.Namespace, out: Path) -> dict:
    if not TRL_PYTHON.exists():
        raise SystemExit(f"{TRL_PYTHON} is missing: build the TRL venv (benchmarks/README.md)")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(TRL_PYTHON), __file__, "--_trl-worker", "--steps", str(args.steps), "--seed",
           str(args.seed), "--model", str(args.model), "--output-dir", str(out)]
    with child_load_monitor() as load:
        run_logged(cmd, out.with_suffix(".log"))
    r = json.loads((out / "result.json").read_text())
    return {**summarize(r["step_s"], r["sampled_tokens"], r["cpu_s"], r["rollout_s"]),
            "load": load.note(), "versions": r["versions"], "final": out / "final"}


class StepCpuProbe:
    """CPU time of a running ``e3rl train rl`` (process and children, all threads), read
    each time a new ``train`` record appears in its log: per-step CPU seconds without
    touching the trainer (read within 50 ms of the record; a step takes seconds)."""

    def __init__(self, log: Path):
        self.log, self.num_seen, self.cpu_at_step = log, 0, []

    def __call__(self, proc: subprocess.Popen) -> None:
        import psutil

        try:
            num = self.log.read_text().count('"event": "train"')
        except FileNotFoundError:
            return
        if num > self.num_seen:
            try:
                p = psutil.Process(proc.pid)
                cpu = sum(t.user + t.system for t in
                          [p.cpu_times(), *(c.cpu_times() for c in p.children(True))])
            except psutil.NoSuchProcess:
                return
            self.cpu_at_step += [cpu] * (num - self.num_seen)
            self.num_seen = num

    def per_step(self) -> list[float]:
        return [b - a for a, b in zip([0.0, *self.cpu_at_step], self.cpu_at_step)]


def run_e3rl(args: argparse.Namespace, out: Path, token_target: int | None) -> dict:
    help_run = subprocess.run([str(E3RL_CLI), "train", "rl", "--help"], capture_output=True,
                              text=True)
    if help_run.returncode != 0:
        raise SystemExit("`e3rl train rl` is not available in .venv yet")
    max_steps, budget = args.steps, []
    # Equal sampled tokens: stop at the first step whose cumulative count reaches TRL's total
    # (the cap of 4x steps only guards against a run that samples far fewer tokens per step).
    # Both sample 128 completions per step from the same start, so the step counts come out
    # (nearly) equal too, and the speed figures compare like with like.
    if token_target and "--max-sampled-tokens" in help_run.stdout:
        max_steps, budget = 4 * args.steps, ["--max-sampled-tokens", str(token_target)]
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(E3RL_CLI), "train", "rl", "--model", str(args.model), "--algo", "grpo",
           "--dataset", "arith-chain", "--output-dir", str(out), "--max-steps", str(max_steps),
           "--seed", str(args.seed), "--group-size", str(GROUP_SIZE), "--prompts-per-step",
           str(PROMPTS_PER_STEP), "--temperature", str(TEMPERATURE), "--lr", str(LR),
           "--max-tokens", str(MAX_TOKENS), "--updates-per-batch", "1", "--kl-coef", "0",
           "--eval-every", "0", "--no-dynamic-sampling", *budget,
           "--num-threads", str(args.num_threads),
           # Not in the comparison: no periodic checkpoints, no progress bar.
           "--checkpoint-every", "0", "--no-progress"]
    probe = StepCpuProbe(out / "train_log.jsonl")
    with child_load_monitor() as load:
        run_logged(cmd, out.with_suffix(".log"), on_poll=probe)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()
               if line.strip()]
    records = sorted((r for r in records if r.get("event") == "train"), key=lambda r: r["step"])
    totals = [r["sampled_tokens"] for r in records]  # cumulative
    per_step = [b - a for a, b in zip([0, *totals], totals)]
    return {**summarize([r["time_step_s"] for r in records], per_step, probe.per_step(),
                        [r["time_rollout_s"] for r in records]),
            "load": load.note(), "final": out / "final", "token_budget": bool(budget)}


def print_table(start: float, trl: dict | None, e3: dict | None) -> None:
    def cell(res, key, fmt):
        return format(res[key], fmt) if res is not None and res.get(key) is not None else "—"

    def ratio(key):
        if trl is None or e3 is None or not trl.get(key) or e3.get(key) is None:
            return "—"
        return f"{e3[key] / trl[key]:.2f}x"

    rows = [("steps run", "steps", "d"),
            ("seconds / step (median, after step 1)", "s_per_step", ".2f"),
            ("  rollout (generate + reward)", "rollout_s_per_step", ".2f"),
            ("  update (forward, backward, step)", "train_s_per_step", ".2f"),
            ("CPU seconds / step (median)", "cpu_s_per_step", ".2f"),
            ("sampled tokens / s", "tokens_per_s", ".0f"),
            ("total sampled tokens", "total_sampled_tokens", "d"),
            ("training wall time (s)", "train_wall_s", ".0f")]
    print(f"\n{'':<40} {'TRL GRPOTrainer':>16} {'e3rl GRPO':>12} {'e3rl/TRL':>9}")
    for label, key, fmt in rows:
        print(f"{label:<40} {cell(trl, key, fmt):>16} {cell(e3, key, fmt):>12} "
              f"{ratio(key):>9}")
    pct = lambda res: "—" if res is None else f"{100 * res['pass1']:.1f}%"  # noqa: E731
    before = {"pass1": start}
    print(f"{'greedy pass@1 before':<40} {pct(trl and before):>16} {pct(e3 and before):>12}")
    print(f"{'greedy pass@1 after':<40} {pct(trl):>16} {pct(e3):>12}")
    if trl is not None and e3 is not None:
        note = (f"e3rl stopped at {e3['total_sampled_tokens']} >= TRL's "
                f"{trl['total_sampled_tokens']} tokens" if e3.get("token_budget") else
                f"NOT equal: e3rl ran {e3['steps']} steps, {e3['total_sampled_tokens']} tokens")
        print(f"{'greedy pass@1 after equal sampled tokens':<40} {pct(trl):>16} "
              f"{pct(e3):>12}   ({note})")
    for name, res in (("TRL", trl), ("e3rl", e3)):
        if res is not None:
            print(f"{name}: {res['load']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps of TRL (and of "
                        "e3rl when it cannot stop at TRL's sampled-token total).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-problems", type=int, default=500)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--output-dir", default="/tmp/e3rl-bench/rl")
    parser.add_argument("--num-threads", type=int, default=0,
                        help="torch threads of every subprocess (OMP_NUM_THREADS; 0: torch's "
                        "default). 1 keeps a busy neighbour from stalling torch's thread "
                        "barriers, which on 2 cores costs more than the second thread gains.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--trl-only", action="store_true")
    which.add_argument("--e3rl-only", action="store_true")
    parser.add_argument("--_trl-worker", dest="trl_worker", action="store_true",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(args)
        return

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.num_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.num_threads)  # inherited by every subprocess
    print(f"load average before: {os.getloadavg()}", flush=True)
    start = greedy_pass1(Path(args.model), out / "eval_start.json", args)
    trl = e3 = None
    if not args.e3rl_only:
        trl = run_trl(args, out / "trl")
        trl["pass1"] = greedy_pass1(trl["final"], out / "eval_trl.json", args)
    if not args.trl_only:
        previous = out / "trl" / "result.json"  # --e3rl-only: TRL's total from an earlier run
        target = trl["total_sampled_tokens"] if trl else (
            sum(json.loads(previous.read_text())["sampled_tokens"]) if previous.exists()
            else None)
        e3 = run_e3rl(args, out / "e3rl", target)
        e3["pass1"] = greedy_pass1(e3["final"], out / "eval_e3rl.json", args)
    print(f"load average after: {os.getloadavg()}")
    if trl is not None:
        print(f"TRL {trl['versions']}")
    print_table(start, trl, e3)
    summary = {"start_pass1": start, "trl": trl, "e3rl": e3, "args": vars(args)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"figures: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
