"""Serving benchmark: a bounded load generator over loopback against ``e3rl serve``, next to
the offline engine on the same workload in the same run.

A fixed number of requests (default 64) is sent by ``--concurrency`` (default 32) streaming
clients; each request is greedy with a fixed prompt (token ids) and output length, so every
run computes exactly the same tokens. Printed: output throughput of the server, of the same
closed loop run straight on ``AsyncEngine`` (no HTTP), and of the offline engine (all requests
at once), with the same model, dtype, threads and batch limit; the server's overhead; and the
time-to-first-token / inter-token latency / end-to-end percentiles seen by the clients.

    .venv/bin/python benchmarks/serving.py [--model DIR] [--dtype bfloat16]
        [--num-requests 64] [--concurrency 32] [--num-threads N]

Without ``--model`` it uses the ~100M Qwen3-shaped random model of ``throughput.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LoadMonitor, bench_model, launch_server, model_workload  # noqa: E402

from e3rl.engine import LLM, SamplingParams  # noqa: E402


@dataclass
class RequestStats:
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    num_tokens: int = 0
    num_chunks: int = 0
    text: str = ""


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict[int, float]:
    ordered = sorted(values)
    if not ordered:
        return {q: float("nan") for q in qs}
    return {q: ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]
            for q in qs}


def start_server(args) -> tuple[subprocess.Popen, str]:
    return launch_server(["--model", str(args.model), "--dtype", args.dtype,
                          "--max-num-seqs", str(args.concurrency),
                          "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                          "--kv-cache-memory-gb", str(args.kv_cache_memory_gb),
                          "--no-access-log", "--log-level", "warning",
                          "--num-threads", str(args.num_threads)])


async def one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int
                      ) -> RequestStats:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    stats = RequestStats()
    t0 = last = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                stats.num_tokens = event["usage"]["completion_tokens"]
                continue
            now = time.perf_counter()
            if not stats.num_chunks:
                stats.ttft_s = now - t0
            else:
                stats.itl_s.append(now - last)
            last = now
            stats.num_chunks += 1
            stats.text += event["choices"][0]["text"]
    stats.e2e_s = time.perf_counter() - t0
    return stats


async def run_load(url: str, prompts: list[list[int]], output_lens: list[int],
                   concurrency: int) -> tuple[float, list[RequestStats]]:
    """Send every request with at most ``concurrency`` in flight; returns (wall, stats)."""
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    results: list[RequestStats | None] = [None] * len(prompts)

    async def worker(client):
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await one_request(client, prompts[i], output_lens[i])

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, prompts[0][:16], 4)  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return wall, results  # type: ignore[return-value]


def run_async_engine(args, prompts, output_lens) -> float:
    """The same closed loop straight on ``AsyncEngine`` (no HTTP): separates the cost of the
    HTTP front end from that of the engine thread and the closed-loop arrivals."""
    from e3rl.engine import EngineConfig
    from e3rl.engine.async_engine import AsyncEngine

    engine = AsyncEngine(EngineConfig(
        model=str(args.model), dtype=args.dtype, max_num_seqs=args.concurrency,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_gb=args.kv_cache_memory_gb, num_threads=args.num_threads))
    engine.start()

    async def one(i: int, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        async for _ in engine.generate(f"r{i}", prompt, params):
            pass

    async def main() -> float:
        await one(-1, prompts[0][:16], 4)  # warm-up
        todo = list(range(len(prompts)))

        async def worker():
            while todo:
                i = todo.pop(0)
                await one(i, prompts[i], output_lens[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return time.perf_counter() - t0

    try:
        return asyncio.run(main())
    finally:
        engine.shutdown()


def run_offline(args, prompts, output_lens) -> tuple[float, list[str]]:
    llm = LLM(str(args.model), dtype=args.dtype, max_num_seqs=args.concurrency,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_gb=args.kv_cache_memory_gb, num_threads=args.num_threads)
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    return wall, [o.outputs[0].text for o in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model dir (default: 100M bench)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-threads", type=int, default=psutil.cpu_count(),
                   help="torch threads, the same for the server and the offline engine")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--kv-cache-memory-gb", type=float, default=2.0)
    p.add_argument("--prompt-range", default="16,512")
    p.add_argument("--output-range", default="16,256")
    p.add_argument("--skip-offline", action="store_true", help="measure the server only")
    args = p.parse_args()
    if args.model is None:
        args.model = bench_model()
    work = model_workload(args.model, args.num_requests, args.prompt_range, args.output_range)
    total_tokens = work.num_output_tokens
    print(f"model {args.model} ({args.dtype}), {args.num_requests} requests, concurrency "
          f"{args.concurrency}, {total_tokens} output tokens, {args.num_threads} torch "
          f"threads, {psutil.cpu_count()} cores")

    server, url = start_server(args)
    try:
        with LoadMonitor(server.pid) as server_load:
            wall, stats = asyncio.run(run_load(url, work.prompts, work.output_lens,
                                               args.concurrency))
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)
    assert sum(s.num_tokens for s in stats) == total_tokens, "token counts differ"
    served = total_tokens / wall
    print(f"\nserver  : {served:7.1f} output tok/s  ({wall:.1f} s)  {server_load.note()}")
    if not args.skip_offline:
        with LoadMonitor() as async_load:
            async_wall = run_async_engine(args, work.prompts, work.output_lens)
        print(f"engine  : {total_tokens / async_wall:7.1f} output tok/s  ({async_wall:.1f} s)  "
              f"{async_load.note()}  (AsyncEngine, same closed loop, no HTTP)")
        with LoadMonitor() as offline_load:
            offline_wall, offline_texts = run_offline(args, work.prompts, work.output_lens)
        same = sum(s.text == t for s, t in zip(stats, offline_texts))
        offline = total_tokens / offline_wall
        print(f"offline : {offline:7.1f} output tok/s  ({offline_wall:.1f} s)  "
              f"{offline_load.note()}  (LLM.generate, all requests at once)")
        print(f"server overhead: {100 * (offline / served - 1):+.1f}% wall time vs offline "
              f"(server = {served / offline:.3f} x offline), HTTP alone "
              f"{100 * (wall / async_wall - 1):+.1f}% vs the AsyncEngine loop")
        print(f"greedy texts identical to offline: {same}/{len(stats)}")
    rows = [("TTFT", [s.ttft_s for s in stats]),
            ("ITL", [x for s in stats for x in s.itl_s]),
            ("E2E", [s.e2e_s for s in stats])]
    print("\nlatency (ms)      p50      p90      p99")
    for name, values in rows:
        q = percentiles(values)
        print(f"{name:<12} {1e3 * q[50]:8.1f} {1e3 * q[90]:8.1f} {1e3 * q[99]:8.1f}")


if __name__ == "__main__":
    main()
