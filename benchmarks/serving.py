"""Serving benchmark: a bounded load generator over loopback against ``e3rl serve``, next to
the engine without HTTP on the same workload in the same run.

For each ``--concurrency`` (default 32 and 64), ``2 x concurrency`` requests are sent by that
many streaming clients; each request is greedy with a fixed prompt (token ids) and output
length, so every run computes exactly the same tokens. Measured, in this order: the server
with its engine in a process of its own (the default), the server with the engine loop on a
thread (``--no-engine-process``), the same closed loop straight on ``AsyncEngine`` (no HTTP:
the engine's own TTFT under the same arrivals), the offline engine in the same closed loop
(``LLMEngine.step`` driven directly: a finished request's slot takes the next request in the
same step, no HTTP, no process boundary, no delay), and the offline engine with all requests
queued at once (``LLM.generate``); same model, dtype, threads and batch limit. Printed per
concurrency: output tok/s and the ratio to each offline row, TTFT / inter-token percentiles,
whether greedy texts match offline, and the CPU seconds of the server's front end, its engine
core and the load generator during each server row.

    .venv/bin/python benchmarks/serving.py [--model DIR] [--dtype bfloat16]
        [--concurrency 32,64] [--num-threads N] [--repeat N] [--client aiohttp|httpx]
        [--out FILE.json]

``--repeat N`` runs every system N times in turn (drift on a shared machine then hits each
alike) and shows each system's run of median wall time. The load generator's HTTP client is
aiohttp (as vLLM's serving benchmark uses); ``--client httpx`` takes the OpenAI client's
transport, which spends about twice the CPU per streamed token (on two cores, taken from the
server under test).

Without ``--model`` it uses the ~100M Qwen3-shaped random model of ``throughput.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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


def start_server(args, concurrency: int, engine_process: bool) -> tuple[subprocess.Popen, str]:
    return launch_server(["--model", str(args.model), "--dtype", args.dtype,
                          "--max-num-seqs", str(concurrency),
                          "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                          "--kv-cache-memory-gb", str(args.kv_cache_memory_gb),
                          "--no-access-log", "--log-level", "warning",
                          "--num-threads", str(args.num_threads),
                          "--engine-process" if engine_process else "--no-engine-process"])


async def _lines_httpx(client: httpx.AsyncClient, body: dict):
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            yield line


async def _lines_aiohttp(session, body: dict):
    async with session.post("/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
        async for raw in r.content:  # one line at a time
            yield raw.decode().rstrip("\r\n")


async def one_request(client, prompt: list[int], max_tokens: int) -> RequestStats:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    stats = RequestStats()
    t0 = last = time.perf_counter()
    lines = _lines_httpx if isinstance(client, httpx.AsyncClient) else _lines_aiohttp
    async for line in lines(client, body):
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


@contextlib.asynccontextmanager
async def http_client(kind: str, url: str, concurrency: int, headers: dict | None = None):
    """The load generator's HTTP client: aiohttp (as vLLM's serving benchmark uses; about
    half of httpx's CPU per streamed token, which on two cores is taken from the server) or
    httpx (the OpenAI client's transport)."""
    if kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                     headers=headers) as client:
            yield client
        return
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=url, connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=600)) as client:
        yield client


async def run_load(url: str, prompts: list[list[int]], output_lens: list[int],
                   concurrency: int, client_kind: str = "aiohttp",
                   headers: dict | None = None) -> tuple[float, list[RequestStats]]:
    """Send every request with at most ``concurrency`` in flight; returns (wall, stats)."""
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    results: list[RequestStats | None] = [None] * len(prompts)

    async def worker(client):
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await one_request(client, prompts[i], output_lens[i])

    async with http_client(client_kind, url, concurrency, headers) as client:
        await one_request(client, prompts[0][:16], 4)  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return wall, results  # type: ignore[return-value]


def engine_config(args, concurrency: int):
    """The engine every in-process row runs: the server's model, dtype, threads and limits."""
    from e3rl.engine import EngineConfig

    return EngineConfig(model=str(args.model), dtype=args.dtype, max_num_seqs=concurrency,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_cache_memory_gb=args.kv_cache_memory_gb,
                        num_threads=args.num_threads)


def run_async_engine(args, prompts, output_lens, concurrency) -> tuple[float, list[float]]:
    """The same closed loop straight on ``AsyncEngine`` (no HTTP): separates the cost of the
    HTTP front end from that of the engine thread and the closed-loop arrivals."""
    from e3rl.engine.async_engine import AsyncEngine

    engine = AsyncEngine(engine_config(args, concurrency))
    engine.start()

    ttfts: list[float] = []

    async def one(i: int, prompt: list[int], max_tokens: int) -> None:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        t0, first = time.perf_counter(), None
        async for _ in engine.generate(f"r{i}", prompt, params):
            if first is None:
                first = time.perf_counter() - t0
        if i >= 0:
            ttfts.append(first)

    async def main() -> float:
        await one(-1, prompts[0][:16], 4)  # warm-up
        todo = list(range(len(prompts)))

        async def worker():
            while todo:
                i = todo.pop(0)
                await one(i, prompts[i], output_lens[i])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0

    try:
        return asyncio.run(main()), ttfts
    finally:
        engine.shutdown()


def run_offline(args, prompts, output_lens, concurrency) -> tuple[float, list[str]]:
    llm = LLM(**dataclasses.asdict(engine_config(args, concurrency)))
    llm.generate([prompts[0][:16]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    return wall, [o.outputs[0].text for o in outs]


def run_offline_closed_loop(args, prompts, output_lens, concurrency) -> tuple[float, list[float]]:
    """The clients' closed loop without clients: ``concurrency`` requests in flight, each
    finished one replaced by the next in the same step. TTFT is to the first token's step."""
    from e3rl.engine.llm_engine import LLMEngine

    engine = LLMEngine(engine_config(args, concurrency))
    engine.add_request("warm-up", prompts[0][:16], SamplingParams(temperature=0, max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    todo = iter(range(len(prompts)))
    started: dict[str, float] = {}
    ttfts: list[float] = []

    def add_next() -> None:
        i = next(todo, None)
        if i is not None:
            started[str(i)] = time.perf_counter()
            engine.add_request(str(i), prompts[i], SamplingParams(
                temperature=0, max_tokens=output_lens[i], ignore_eos=True))

    t0 = time.perf_counter()
    for _ in range(concurrency):
        add_next()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id in started and out.outputs[0].token_ids:
                ttfts.append(time.perf_counter() - started.pop(out.request_id))
            if out.finished:
                add_next()
    return time.perf_counter() - t0, ttfts


def cpu_seconds(server: psutil.Process) -> dict[str, float]:
    """CPU seconds so far of the server's front end, of its children (the engine core), and
    of this process (the load generator)."""
    def used(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        return t.user + t.system

    return {"front_end": used(server),
            "engine_core": sum(used(c) for c in server.children(recursive=True)),
            "client": used(psutil.Process())}


def run_server(args, work, concurrency: int, engine_process: bool) -> dict:
    server, url = start_server(args, concurrency, engine_process)
    try:
        proc = psutil.Process(server.pid)
        before = cpu_seconds(proc)
        with LoadMonitor(server.pid) as load:
            wall, stats = asyncio.run(run_load(url, work.prompts, work.output_lens,
                                               concurrency, args.client))
        after = cpu_seconds(proc)
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=60)
    assert sum(s.num_tokens for s in stats) == work.num_output_tokens, "token counts differ"
    return {"wall_s": wall, "ttft_s": [s.ttft_s for s in stats],
            "itl_s": [x for s in stats for x in s.itl_s], "texts": [s.text for s in stats],
            "cpu_s": {k: after[k] - before[k] for k in after},
            "other_load": load.other_share, "note": load.note()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model dir (default: 100M bench)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--concurrency", default="32,64",
                   help="comma-separated; each runs 2 x concurrency requests")
    p.add_argument("--num-threads", type=int, default=psutil.cpu_count(),
                   help="torch threads, the same for the server and the offline engine")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-memory-gb", type=float, default=2.0)
    p.add_argument("--prompt-range", default="16,512")
    p.add_argument("--output-range", default="16,256")
    p.add_argument("--systems", default="process,thread,engine,loop,offline",
                   help="any of: process (server, engine process), thread (server, "
                   "--no-engine-process), engine (AsyncEngine closed loop), loop (offline "
                   "engine, same closed loop), offline (LLM.generate, all at once)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every system this many times, in turn; rows show the run of "
                   "median wall time")
    p.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp",
                   help="the load generator's HTTP client")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = p.parse_args()
    if args.model is None:
        args.model = bench_model()
    systems = args.systems.split(",")
    results = []
    for concurrency in map(int, args.concurrency.split(",")):
        work = model_workload(args.model, 2 * concurrency, args.prompt_range,
                              args.output_range)
        total = work.num_output_tokens
        print(f"\n== concurrency {concurrency}: {2 * concurrency} requests, {total} output "
              f"tokens, model {args.model.name} ({args.dtype}), {args.num_threads} torch "
              f"threads, {psutil.cpu_count()} cores")
        repeats: dict[str, list[dict]] = {}
        for rep in range(args.repeat):  # the systems in turn, so that drift hits them alike
            for name, engine_process in (("process", True), ("thread", False)):
                if name in systems:
                    repeats.setdefault(name, []).append(
                        run_server(args, work, concurrency, engine_process))
            for name, closed_loop in (("engine", run_async_engine),
                                      ("loop", run_offline_closed_loop)):
                if name in systems:
                    with LoadMonitor() as load:
                        wall, ttfts = closed_loop(args, work.prompts, work.output_lens,
                                                  concurrency)
                    repeats.setdefault(name, []).append(
                        {"wall_s": wall, "ttft_s": ttfts, "itl_s": [],
                         "other_load": load.other_share, "note": load.note()})
            if "offline" in systems:
                with LoadMonitor() as load:
                    wall, texts = run_offline(args, work.prompts, work.output_lens, concurrency)
                repeats.setdefault("offline", []).append(
                    {"wall_s": wall, "ttft_s": [], "itl_s": [], "texts": texts,
                     "other_load": load.other_share, "note": load.note()})
        # each system's run of median wall time (its latencies and CPU seconds with it); every
        # run's tok/s is kept in the JSON
        runs: dict[str, dict] = {}
        for name, samples in repeats.items():
            ordered = sorted(samples, key=lambda r: r["wall_s"])
            runs[name] = {**ordered[(len(ordered) - 1) // 2],
                          "tok_s_runs": [total / r["wall_s"] for r in samples],
                          "other_load": max(r["other_load"] for r in samples)}
            if args.repeat > 1:
                print(f"{name}: tok/s of each run "
                      + ", ".join(f"{total / r['wall_s']:.1f}" for r in samples))
        offline = runs.get("offline")
        labels = {"process": "server, engine process", "thread": "server, engine thread",
                  "engine": "AsyncEngine loop, no HTTP", "loop": "offline, same closed loop",
                  "offline": "offline LLM.generate"}
        loop = runs.get("loop")
        print(f"{'system':<27} {'tok/s':>7} {'x offline':>9} {'x loop':>7} {'TTFT p50':>9} "
              f"{'p90':>7} {'ITL p50':>8} {'p99':>6}  load")
        for run in runs.values():
            run["tok_s"] = total / run["wall_s"]
        for name, run in runs.items():
            ratio = run["tok_s"] / offline["tok_s"] if offline else float("nan")
            loop_ratio = run["tok_s"] / loop["tok_s"] if loop else float("nan")
            ttft, itl = percentiles(run["ttft_s"]), percentiles(run["itl_s"])
            run.update(ttft_p50_ms=1e3 * ttft[50], ttft_p90_ms=1e3 * ttft[90],
                       itl_p50_ms=1e3 * itl[50], itl_p99_ms=1e3 * itl[99], x_offline=ratio,
                       x_closed_loop=loop_ratio)
            print(f"{labels[name]:<27} {run['tok_s']:7.1f} {ratio:9.3f} {loop_ratio:7.3f} "
                  f"{1e3 * ttft[50]:9.0f} "
                  f"{1e3 * ttft[90]:7.0f} {1e3 * itl[50]:8.1f} {1e3 * itl[99]:6.0f}  "
                  f"{run['note']}")
        for name in ("process", "thread"):
            if name in runs:
                cpu = runs[name]["cpu_s"]
                print(f"CPU seconds during {labels[name]} ({runs[name]['wall_s']:.1f} s wall): "
                      + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in cpu.items()))
        for ref in ("engine", "loop"):
            if ref in runs:
                for name in ("process", "thread"):
                    if name in runs:
                        print(f"TTFT p50 {labels[name]} / {labels[ref]}: "
                              f"{runs[name]['ttft_p50_ms'] / runs[ref]['ttft_p50_ms']:.3f}")
        if offline:
            for name in ("process", "thread"):
                if name in runs:
                    same = sum(a == b for a, b in zip(runs[name]["texts"], offline["texts"]))
                    print(f"greedy texts of {labels[name]} identical to offline: "
                          f"{same}/{len(offline['texts'])}")
        for run in runs.values():
            run.pop("texts", None)
            run.pop("ttft_s"), run.pop("itl_s")
        results.append({"concurrency": concurrency, "num_requests": 2 * concurrency,
                        "num_output_tokens": total, "runs": runs})
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "dtype": args.dtype,
                                        "num_threads": args.num_threads,
                                        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
