"""Trajectory-store cost: serving throughput with the store on (``--store all``) vs off
(``--store none``), in the same run.

Two ``e3rl serve`` processes, identical but for ``--store``, are up at once. The workload
(streaming, greedy, fixed prompts and output lengths, so both servers compute the same
tokens) is cut into blocks of ``--block`` requests; each block runs as a closed loop of
``--concurrency`` clients against one server, then against the other, the order alternating
block by block, so that other load on the machine falls on both alike (the idle server costs
nothing: its engine thread sleeps). Throughput per mode = its tokens / its summed wall time;
the ratio on/off is the figure (target >= 0.95), with the spread of the per-block ratios.
Also printed: the store's counters (every request written, none dropped) and its mean
commit wait (how long a finished request's last chunk waited for its trajectory's commit).

With ``--max-num-seqs`` equal to the concurrency (the default) the servers' batch is full
only while every client has a request running: the commit wait of a finished request (its
last chunk is held until its trajectory is durable) idles a batch slot, so the cost shows in
full. With more clients than ``--max-num-seqs`` (a saturated server), waiting requests take
the slot at once.

The default model is the ~100M Qwen3-shaped model of ``throughput.py`` and ``serving.py``
(bf16, 128 requests). ``--model tiny`` takes the tiny 2-layer Qwen3 of the tests (float32,
1,024 requests), where a request lasts ~0.1 s and the store's per-request cost (a commit
wait of a few ms, ~0.3 ms of CPU) weighs the most: a worst case.

    .venv/bin/python benchmarks/store.py [--model tiny] [--num-requests N] [--block 32]
        [--concurrency 16] [--max-num-seqs 16] [--synchronous FULL]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, LoadMonitor, bench_model, launch_server, model_workload  # noqa: E402
from serving import run_load  # noqa: E402

from e3rl.engine.model_factory import build_tiny_model  # noqa: E402


def tiny_model() -> Path:
    path = CACHE / "tiny-qwen3"
    if not (path / "config.json").exists():
        build_tiny_model(path, "qwen3", seed=1)
    return path


def start_server(args, store: str, data_dir: str) -> tuple[subprocess.Popen, str]:
    return launch_server(["--model", str(args.model), "--dtype", args.dtype,
                          "--max-num-seqs", str(args.max_num_seqs or args.concurrency),
                          "--num-kv-blocks", str(args.num_kv_blocks), "--no-access-log",
                          "--log-level", "warning", "--num-threads", str(args.num_threads),
                          "--store", store, "--data-dir", data_dir,
                          "--store-synchronous", args.synchronous])


def server_cpu_s(proc: subprocess.Popen) -> tuple[float, float]:
    t = psutil.Process(proc.pid).cpu_times()
    return t.user, t.system


def store_counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith(("e3rl_trajector", "e3rl_requests_total"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir, or 'tiny' (default: the 100M "
                   "benchmark model)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 (float32 for tiny)")
    p.add_argument("--num-requests", type=int, default=None, help="default: 128 (1024 tiny)")
    p.add_argument("--block", type=int, default=None, help="requests per alternation block "
                   "(default: 32; 64 tiny)")
    p.add_argument("--concurrency", type=int, default=16, help="clients in the closed loop")
    p.add_argument("--max-num-seqs", type=int, default=None, help="the servers' batch limit "
                   "(default: --concurrency, where every ms a finished request waits for its "
                   "commit idles a batch slot; above it, queued requests fill the slot)")
    p.add_argument("--num-threads", type=int, default=1, help="torch threads per server")
    p.add_argument("--num-kv-blocks", type=int, default=1024)
    p.add_argument("--prompt-range", default="16,64")
    p.add_argument("--output-range", default="16,64")
    p.add_argument("--synchronous", default="FULL", help="the store's SQLite synchronous mode")
    args = p.parse_args()
    is_tiny = args.model == "tiny"
    args.model = tiny_model() if is_tiny else Path(args.model) if args.model else bench_model()
    args.dtype = args.dtype or ("float32" if is_tiny else "bfloat16")
    args.num_requests = args.num_requests or (1024 if is_tiny else 128)
    args.block = args.block or (64 if is_tiny else 32)
    work = model_workload(args.model, args.num_requests, args.prompt_range, args.output_range)
    total = work.num_output_tokens
    print(f"model {args.model} ({args.dtype}), {args.num_requests} streaming requests per "
          f"server in blocks of {args.block}, concurrency {args.concurrency}, max-num-seqs "
          f"{args.max_num_seqs or args.concurrency}, {total} output "
          "tokens, "
          f"{args.num_threads} torch thread(s) per server, {psutil.cpu_count()} cores, store "
          f"synchronous={args.synchronous}")

    with tempfile.TemporaryDirectory(prefix="e3rl-store-bench-") as data_root:
        servers = {mode: start_server(args, mode, f"{data_root}/{mode}")
                   for mode in ("none", "all")}
        wall = {"none": 0.0, "all": 0.0}
        # Server process CPU time (all its threads), user and system.
        user, system = {"none": 0.0, "all": 0.0}, {"none": 0.0, "all": 0.0}
        block_ratios = []
        try:
            load = LoadMonitor(servers["all"][0].pid)
            load.pids.append(servers["none"][0].pid)  # both servers are "ours"
            with load:
                for b, lo in enumerate(range(0, args.num_requests, args.block)):
                    hi = min(lo + args.block, args.num_requests)
                    order = ("none", "all") if b % 2 == 0 else ("all", "none")
                    block = {}
                    for mode in order:
                        cpu0 = server_cpu_s(servers[mode][0])
                        block[mode], stats = asyncio.run(run_load(
                            servers[mode][1], work.prompts[lo:hi], work.output_lens[lo:hi],
                            args.concurrency))
                        assert sum(s.num_tokens for s in stats) == sum(work.output_lens[lo:hi])
                        wall[mode] += block[mode]
                        cpu1 = server_cpu_s(servers[mode][0])
                        user[mode] += cpu1[0] - cpu0[0]
                        system[mode] += cpu1[1] - cpu0[1]
                    block_ratios.append(block["none"] / block["all"])
            counters = store_counters(servers["all"][1])
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGINT)
                proc.communicate(timeout=60)

    rate = {mode: total / w for mode, w in wall.items()}
    num_blocks = len(block_ratios)
    num_requests = args.num_requests + num_blocks  # + one untimed warm-up request per block
    written = counters.get("e3rl_trajectories_written_total", 0)
    waits = counters.get("e3rl_trajectory_commit_wait_seconds_count", 0)
    mean_wait_ms = 1e3 * counters.get("e3rl_trajectory_commit_wait_seconds_sum", 0) \
        / max(waits, 1)
    q = statistics.quantiles(block_ratios, n=4) if num_blocks >= 2 else block_ratios * 3
    for mode, name in (("none", "store off"), ("all", "store on ")):
        print(f"{name}: {rate[mode]:8.1f} output tok/s ({wall[mode]:.1f} s; server CPU per "
              f"output token: user {1e6 * user[mode] / total:.0f} us, system "
              f"{1e6 * system[mode] / total:.0f} us)")
    print(f"on/off throughput: {rate['all'] / rate['none']:.3f} (target >= 0.95); per block: "
          f"median {statistics.median(block_ratios):.3f}, quartiles {q[0]:.3f}-{q[2]:.3f} "
          f"over {num_blocks} blocks; {load.note()}")
    print(f"store: {written:.0f} trajectories written for {num_requests} requests, "
          f"{counters.get('e3rl_trajectories_dropped_total', 0):.0f} dropped, "
          f"{counters.get('e3rl_trajectory_commit_timeouts_total', 0):.0f} commit timeouts; "
          f"mean commit wait {mean_wait_ms:.2f} ms")


if __name__ == "__main__":
    main()
