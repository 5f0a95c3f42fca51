"""The E³RL experiment: GRPO, E³RL and one-component-off ablations, in two settings.

Every arm trains from the same model on the same prompt stream with the same sampling
seeds, to the same budget of sampled tokens; curves are logged on the validation split (used
for choices), and each final model is scored once on the test split (greedy and sampled
pass@1, 500 problems, the same sampling seed for every arm). Runs already finished are
skipped, so the script can be stopped and started again. Results land in OUT/SETTING/ARM-sSEED
(train_log.jsonl, final/, test.json) and a summary (JSON and Markdown) in OUT.

    python benchmarks/rl_experiment.py --out runs/rl-exp --workers 2            # everything
    python benchmarks/rl_experiment.py --out runs/rl-exp --summary-only         # table only
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
E3RL = Path(sys.executable).parent / "e3rl"

SETTINGS = {
    # The bundled model on its own distribution (2-5 step chains): little headroom.
    "bundled": [],
    # Longer chains only (5 steps): greedy ~61%, sampled ~49%, pass@8 ~87% at the start.
    "long": ["--arith-min-steps", "5", "--arith-max-steps", "5"],
}
ARMS = {
    "grpo": ["--algo", "grpo"],
    "e3rl": ["--algo", "e3rl"],  # the shipped design: segment weights + fork learning
    "e3rl-no-fork": ["--algo", "e3rl", "--erasure-learning", "off"],
    "e3rl-no-seg": ["--algo", "e3rl", "--no-segment-weights"],
    "e3rl+heal": ["--algo", "e3rl", "--heal-rollouts"],
    "first-reading": ["--algo", "e3rl", "--heal-rollouts", "--erasure-learning", "pairs"],
    # Variants tried after the main table (validation only decides; 1 seed each).
    "e3rl-fork8": ["--algo", "e3rl", "--fork-max-per-step", "8"],
    "e3rl-seg-neg": ["--algo", "e3rl", "--segment-weight-mode", "negative"],
}
COMMON = ["--model", str(ROOT / "models" / "arith-chain"), "--group-size", "8",
          "--prompts-per-step", "8", "--lr", "1e-4", "--temperature", "1.0",
          "--max-tokens", "128", "--max-steps", "1000", "--eval-every", "10",
          "--eval-problems", "200", "--checkpoint-every", "0", "--no-progress",
          "--num-threads", "1"]
TEST_PROBLEMS = 500


def plan(settings: list[str], arms: list[str], seeds: list[int],
         ablation_seeds: list[int]) -> list[tuple[str, str, int]]:
    """Runs in priority order: seed 0 of the main arms, ablations, then more seeds."""
    main = [a for a in arms if a in ("grpo", "e3rl")]
    ablations = [a for a in arms if a not in main]
    runs = [(s, a, seeds[0]) for a in main for s in settings]
    runs += [(s, a, seed) for a in ablations for seed in ablation_seeds for s in settings]
    runs += [(s, a, seed) for seed in seeds[1:] for a in main for s in settings]
    return runs


def run_one(out: Path, setting: str, arm: str, seed: int, budget: int) -> Path:
    run_dir = out / setting / f"{arm}-s{seed}"
    if not (run_dir / "final").is_dir():
        args = [str(E3RL), "train", "rl", *COMMON, *SETTINGS[setting], *ARMS[arm],
                "--seed", str(seed), "--max-sampled-tokens", str(budget),
                "--output-dir", str(run_dir)]
        if (run_dir / "train_log.jsonl").exists():
            args.append("--resume")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(out / setting / f"{arm}-s{seed}.log", "a") as log:
            subprocess.run(args, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    test_file = run_dir / "test.json"
    if not test_file.exists():
        test_file.write_text(json.dumps(score_on_test(run_dir / "final", setting)) + "\n")
    return run_dir


def score_on_test(model_dir: Path, setting: str) -> dict:
    """Greedy and sampled (T=1, seed 0) pass@1 on the test split, with the setting's knobs."""
    code = f"""
import json, torch
torch.set_num_threads(1)
from e3rl.engine import LLM
from e3rl.trainer.arith import ArithConfig
from e3rl.trainer.datasets import load_problems
from e3rl.trainer.evaluate import EvalSettings, evaluate_in_process
knobs = {json.dumps(dict(zip(SETTINGS[setting][::2], SETTINGS[setting][1::2])))}
config = ArithConfig(min_steps=int(knobs.get("--arith-min-steps", 2)),
                     max_steps=int(knobs.get("--arith-max-steps", 5)))
problems = load_problems("arith-chain:test", limit={TEST_PROBLEMS}, arith_config=config)
llm = LLM({str(model_dir)!r}, dtype="float32", kv_cache_memory_gb=0.2, num_threads=1)
out = {{}}
for name, t in (("greedy", 0.0), ("sampled", 1.0)):
    r = evaluate_in_process(llm, problems, EvalSettings(n=1, temperature=t, seed=0,
                            max_tokens=128), analyze_steps=False).report()
    out[name + "_pass@1"] = r["pass@1"]
out["num_problems"] = len(problems)
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(result.stdout.strip().splitlines()[-1])


def read_log(run_dir: Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        (evals if record.get("event") == "eval" else train).append(record)
    return train, evals


def summarize(out: Path) -> dict:
    """Per setting and arm: final validation and test pass@1 (mean, min-max over seeds),
    and the sampled tokens each run needed to reach GRPO's validation plateau."""
    summary: dict = {}
    for setting in SETTINGS:
        root = out / setting
        if not root.is_dir():
            continue
        runs: dict[str, list[dict]] = {}
        for run_dir in sorted(p for p in root.iterdir() if (p / "test.json").is_file()):
            arm, seed = run_dir.name.rsplit("-s", 1)
            train, evals = read_log(run_dir)
            runs.setdefault(arm, []).append({
                "seed": int(seed), "test": json.loads((run_dir / "test.json").read_text()),
                "val_greedy": [(e["sampled_tokens"], e["greedy_pass@1"]) for e in evals],
                "val_sampled": [(e["sampled_tokens"], e["sampled_pass@1"]) for e in evals],
                "steps": train[-1]["step"] if train else 0,
                "sampled_tokens": train[-1]["sampled_tokens"] if train else 0,
                "seconds": sum(r["time_step_s"] for r in train)})
        plateau = None
        if "grpo" in runs:  # GRPO's plateau: mean over seeds of its last three evals
            plateau = statistics.mean(statistics.mean(v for _, v in r["val_greedy"][-3:])
                                      for r in runs["grpo"])
        start_file = root / "start.json"
        if not start_file.exists():
            start_file.write_text(json.dumps(score_on_test(ROOT / "models" / "arith-chain",
                                                           setting)) + "\n")
        table = {}
        for arm, rs in runs.items():
            def stat(values: list[float]) -> dict:
                return {"mean": statistics.mean(values), "min": min(values), "max": max(values),
                        "n": len(values)}
            reach = [next((t for t, v in r["val_greedy"] if v >= plateau), None)
                     for r in rs] if plateau is not None else []
            table[arm] = {
                "test_greedy": stat([r["test"]["greedy_pass@1"] for r in rs]),
                "test_sampled": stat([r["test"]["sampled_pass@1"] for r in rs]),
                "val_greedy_last3": stat([statistics.mean(v for _, v in r["val_greedy"][-3:])
                                          for r in rs]),
                "tokens_to_grpo_plateau": reach, "seeds": [r["seed"] for r in rs],
                "steps": [r["steps"] for r in rs], "seconds": [r["seconds"] for r in rs]}
        summary[setting] = {"grpo_val_plateau": plateau, "arms": table,
                            "start_test": json.loads(start_file.read_text())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def markdown(summary: dict) -> str:
    lines = []
    for setting, data in summary.items():
        lines += [f"**{setting}** (GRPO validation plateau, greedy: "
                  f"{(data['grpo_val_plateau'] or 0) * 100:.1f}%)", "",
                  "| arm | seeds | test greedy | test sampled | val greedy (last 3 evals) | "
                  "sampled tokens to GRPO's plateau |", "|---|---|---|---|---|---|",
                  f"| start | — | {data['start_test']['greedy_pass@1'] * 100:.1f} | "
                  f"{data['start_test']['sampled_pass@1'] * 100:.1f} | — | — |"]
        for arm, t in sorted(data["arms"].items(),
                             key=lambda kv: list(ARMS).index(kv[0]) if kv[0] in ARMS else 99):
            def cell(s: dict) -> str:
                spread = f" ({s['min'] * 100:.1f}–{s['max'] * 100:.1f})" if s["n"] > 1 else ""
                return f"{s['mean'] * 100:.1f}{spread}"
            reach = ", ".join("never" if r is None else f"{r / 1000:.0f}k"
                              for r in t["tokens_to_grpo_plateau"])
            lines.append(f"| {arm} | {len(t['seeds'])} | {cell(t['test_greedy'])} | "
                         f"{cell(t['test_sampled'])} | {cell(t['val_greedy_last3'])} | {reach} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/rl-exp")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", default="0,1,2", help="Seeds of GRPO and E3RL.")
    parser.add_argument("--ablation-seeds", default="0")
    parser.add_argument("--budget", type=int, default=400_000, help="Sampled tokens per run.")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        runs = plan(args.settings.split(","), args.arms.split(","),
                    [int(s) for s in args.seeds.split(",")],
                    [int(s) for s in args.ablation_seeds.split(",")])
        start = time.time()
        with ThreadPoolExecutor(args.workers) as pool:
            futures = {pool.submit(run_one, out, *run, args.budget): run for run in runs}
            for future, run in futures.items():
                try:
                    future.result()
                    print(f"[{time.time() - start:7.0f} s] done {run}", flush=True)
                except subprocess.CalledProcessError as exc:
                    print(f"[{time.time() - start:7.0f} s] FAILED {run}: {exc}", flush=True)
    summary = summarize(out)
    text = markdown(summary)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
