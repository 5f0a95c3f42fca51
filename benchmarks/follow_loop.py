"""The serve -> train -> swap loop, measured: does following live traffic improve the model?

One run: serve the bundled model (healing on by default: it ships a calibration), drive it
with ``examples/traffic.py`` (arith-chain train-split prompts at T=1.0, feedback on a chosen
fraction), follow it with ``e3rl train follow`` for a fixed time, then stop both. Held-out
pass@1 (arith-chain test split; greedy and T=1.0, healing off and on) and the erasure rate
are measured on the starting model and on the model the server serves at the end, with the
same problems and seeds.

    python benchmarks/follow_loop.py --out runs/follow/reward-free --minutes 15
    python benchmarks/follow_loop.py --out runs/follow/feedback --minutes 15 \\
        --feedback-fraction 0.25

Writes ``OUT/result.json`` (before / after / traffic / trainer summary) and keeps the
trainer's state dir (``follow_log.jsonl``, ``ledger.jsonl``) and every process' log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "arith-chain"
ADMIN = "follow-benchmark-admin-key"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--model", default=str(BUNDLED))
    p.add_argument("--minutes", type=float, default=15.0, help="how long to follow")
    p.add_argument("--feedback-fraction", type=float, default=0.0)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--eval-problems", type=int, default=500)
    p.add_argument("--eval-split", default="test")
    p.add_argument("--trainer-args", default="", help="extra `e3rl train follow` flags")
    return p.parse_args(argv)


def evaluate(model: str, problems: int, split: str) -> dict:
    """pass@1 and erasures per sample, greedy and T=1.0, healing off and on."""
    from e3rl.engine import LLM
    from e3rl.trainer.datasets import load_problems
    from e3rl.trainer.evaluate import EvalSettings, evaluate_in_process

    items = load_problems(f"arith-chain:{split}", limit=problems)
    llm = LLM(model, dtype="float32", kv_cache_memory_gb=0.25, num_threads=2)
    out = {}
    for name, temperature in (("greedy", 0.0), ("t1", 1.0)):
        for heal in (False, True):
            settings = EvalSettings(n=1, temperature=temperature, seed=0, max_tokens=128,
                                    healing={"enabled": True} if heal else None)
            if heal and temperature == 0.0:
                settings.healing = {"enabled": True, "retry_temperature": 1.0}
            report = evaluate_in_process(llm, items, settings, analyze_steps=False,
                                         progress=False).report()
            key = f"{name}_{'heal' if heal else 'plain'}"
            out[key] = {"pass@1": report["pass@1"],
                        "erasures_per_sample": report["erasures_per_sample"]}
    del llm
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "E3RL_ADMIN_KEY": ADMIN}
    t0 = time.time()
    result: dict = {"args": vars(args), "load": os.getloadavg()}
    print("evaluating the starting model ...", flush=True)
    result["before"] = evaluate(args.model, args.eval_problems, args.eval_split)
    print(json.dumps(result["before"]), flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (out / "checkpoints").mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "e3rl.server.cli", "serve", "--model", args.model,
         "--port", str(port), "--admin-key", ADMIN, "--data-dir", str(out / "data"),
         "--checkpoint-dir", str(out / "checkpoints"), "--num-threads", "1"],
        env=env, stdout=open(out / "serve.log", "w"), stderr=subprocess.STDOUT)
    procs = [server]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {out / 'serve.log'}")
            time.sleep(0.5)
        result["models"] = httpx.get(f"{url}/v1/models").json()["data"][0]
        seconds = args.minutes * 60
        traffic = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "traffic.py"), "--url", url,
             "--duration-s", str(seconds), "--concurrency", str(args.concurrency),
             "--feedback-fraction", str(args.feedback_fraction), "--healing", "server",
             "--out", str(out / "traffic.json")],
            env=env, stdout=open(out / "traffic.log", "w"), stderr=subprocess.STDOUT)
        procs.append(traffic)
        trainer = subprocess.Popen(
            [sys.executable, "-m", "e3rl.trainer.cli", "train", "follow", "--server", url,
             "--model", args.model, "--state-dir", str(out / "trainer"),
             "--num-threads", "1", *args.trainer_args.split()],
            env=env, stdout=open(out / "trainer.log", "w"), stderr=subprocess.STDOUT)
        procs.append(trainer)
        traffic.wait(timeout=seconds + 600)
        trainer.send_signal(signal.SIGTERM)
        trainer.wait(timeout=600)
        result["traffic"] = json.loads((out / "traffic.json").read_text())
        state = json.loads((out / "trainer" / "state.json").read_text())
        result["served_version"] = httpx.get(f"{url}/v1/models").json()["data"][0][
            "weight_version"]
        result["trainer_state"] = {k: state[k] for k in ("update", "accepted", "version",
                                                          "serving", "gate_serving")}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    log = [json.loads(line) for line in
           (out / "trainer" / "follow_log.jsonl").read_text().splitlines()]
    outcomes: dict = {}
    for rec in log:
        outcomes[rec["outcome"]] = outcomes.get(rec["outcome"], 0) + 1
    result["updates"] = outcomes
    result["used"] = {s: sum(r["signals"].get(s, 0) for r in log)
                      for s in ("reward", "reward-free")}
    final = out / "trainer" / state["serving"]
    print(f"evaluating the served model {final} ...", flush=True)
    result["after"] = evaluate(str(final), args.eval_problems, args.eval_split)
    result["wall_s"] = round(time.time() - t0, 1)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("before", "after", "updates", "used")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
