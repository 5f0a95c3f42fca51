"""Reliability under load and abuse (issue 15): attacks on a real ``e3rl serve`` on loopback,
each measured and printed as figures.

  fuzz      schemathesis over every operation of the server's own OpenAPI document (without a
            key, with the API key, with the admin key; positive and negative cases) plus
            hypothesis bodies aimed at the request models and raw hostile bodies: no 5xx, every
            error in OpenAI's shape, a normal request answered afterwards.
  overload  4x more concurrent clients than running + waiting slots for a fixed time: the
            excess gets 503 + Retry-After, admitted requests finish (p50/p99 latency), memory
            of the server and its engine core bounded, the engine idle afterwards.
  storm     streaming clients with forced self-healing that drop at random points (before the
            response, after some events, after a random delay): no KV block leaked, nothing
            left running, the finish counters add up.
  slow      clients that read a stream a byte at a time or never: other clients' throughput
            with and without them (same run), server memory against the unread bytes.
  soak      mixed traffic (completions, chat, streams, healing, feedback) with a weight upload
            every --swap-every-s (two checkpoints, alternately): memory, open files and threads
            of the server and its engine core at the start and the end, no error.

Every loop is bounded in count and in time. The model is the tests' tiny Qwen3 (built once
under /tmp/e3rl-bench). ``--out FILE`` writes the figures as JSON. The same functions run the
short versions in tests/reliability/test_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

try:
    from common import CACHE, LoadMonitor, free_port
except ImportError:  # imported as benchmarks.reliability (the tests)
    from benchmarks.common import CACHE, LoadMonitor, free_port

ERROR_KEYS = {"message", "type", "param", "code"}
# Forced self-healing (tests/engine/test_healing.py's FORCE): common characters close a
# segment and every segment scores above the threshold, so erasures happen all the time.
FORCE_HEALING = {"enabled": True, "threshold": -1.0,
                 "segment_boundary": ["a", "e", "i", "o", " ", "\n"], "min_segment_tokens": 2,
                 "max_segment_tokens": 8, "max_erasures": 8, "max_retries_per_segment": 2,
                 "max_erased_fraction": 1.0}


# -- the server and what we read from it ---------------------------------------------------

def tiny_models() -> tuple[Path, Path]:
    """Two tiny Qwen3 checkpoints of the same shapes (seeds 1 and 2), built once."""
    from e3rl.engine.model_factory import build_tiny_model

    paths = []
    for seed in (1, 2):
        path = CACHE / f"tiny-qwen3-seed{seed}"
        if not (path / "config.json").exists():
            build_tiny_model(path, "qwen3", seed=seed)
        paths.append(path)
    return paths[0], paths[1]


def scrape(url: str) -> dict[str, float]:
    """``{sample name (with labels but model): value}`` from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model")
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


def engine_state(url: str) -> dict:
    m = scrape(url)
    return {"running": m["e3rl_requests_running"], "waiting": m["e3rl_requests_waiting"],
            "kv_blocks": m["e3rl_kv_cache_blocks"], "kv_free": m["e3rl_kv_cache_free_blocks"]}


def wait_idle(url: str, timeout_s: float = 30.0) -> dict:
    """The engine's state once nothing runs and every block is free, or at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = engine_state(url)
        state["is_idle"] = (state["running"] == 0 and state["waiting"] == 0
                            and state["kv_free"] == state["kv_blocks"])
        if state["is_idle"] or time.monotonic() > deadline:
            state["blocks_leaked"] = state["kv_blocks"] - state["kv_free"]
            return state
        time.sleep(0.1)


def usage(pid: int) -> dict:
    """Resident memory (MiB), open file descriptors and threads of a process and its
    children (the server's engine core), summed."""
    proc = psutil.Process(pid)
    rss = fds = threads = 0
    server_rss = proc.memory_info().rss
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
            threads += p.num_threads()
        except psutil.NoSuchProcess:
            pass
    return {"rss_mib": round(rss / 2**20, 1), "server_rss_mib": round(server_rss / 2**20, 1),
            "fds": fds, "threads": threads}


class Sampler:
    """``usage(pid)`` every ``every_s`` on a background task, while a phase runs."""

    def __init__(self, pid: int, every_s: float = 0.5):
        self.pid, self.every_s, self.samples = pid, every_s, []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.samples.append(usage(self.pid))
            try:
                await asyncio.wait_for(stop.wait(), self.every_s)
            except asyncio.TimeoutError:
                pass

    def peak(self, key: str = "rss_mib") -> float:
        return max(s[key] for s in self.samples) if self.samples else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def is_openai_error(body) -> bool:
    return (isinstance(body, dict) and set(body) == {"error"}
            and isinstance(body["error"], dict) and set(body["error"]) == ERROR_KEYS
            and isinstance(body["error"]["message"], str)
            and isinstance(body["error"]["type"], str))


# -- raw HTTP over loopback (to drop a connection at an exact point) -------------------------

async def open_request(url: str, path: str, body: dict, headers: dict, rcvbuf: int | None = None):
    """Send ``POST path`` with a JSON body on a fresh connection; returns (reader, writer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = None
    if rcvbuf is not None:  # a small receive window: unread data backs up into the server
        import socket
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock)
    else:
        reader, writer = await asyncio.open_connection(host, int(port))
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n{head}\r\n".encode() + data)
    await writer.drain()
    return reader, writer


def hang_up(writer: asyncio.StreamWriter, reset: bool) -> None:
    """Close without reading the rest: a reset (RST) or an orderly close (FIN)."""
    if reset:
        writer.transport.abort()
    else:
        writer.close()


# -- 1. fuzzing ----------------------------------------------------------------------------

def body_strategy():
    """Hypothesis bodies for /v1/completions and /v1/chat/completions: the fields of the
    request models with values near and past their edges, extra fields, wrong types."""
    from hypothesis import strategies as st

    anything = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                            | st.text(max_size=20),
                            lambda c: st.lists(c, max_size=4)
                            | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=8)
    edge_ints = st.sampled_from([-2**63, -1, 0, 1, 2, 7, 64, 511, 512, 513, 2**31, 2**63, 10**30])
    number = st.one_of(st.floats(allow_nan=False, allow_infinity=False), edge_ints,
                       st.sampled_from([1e308, -1e308, 5e-324, 0.0, -0.0]))
    text = st.text(max_size=60)
    token_ids = st.lists(st.one_of(st.integers(0, 200), edge_ints), max_size=30)
    healing = st.one_of(st.booleans(), anything, st.fixed_dictionaries({}, optional={
        "enabled": st.booleans(), "threshold": number, "kappa": number, "quantile": number,
        "segment_boundary": st.one_of(text, st.lists(text, max_size=4)),
        "min_segment_tokens": edge_ints, "max_segment_tokens": edge_ints,
        "max_erasures": edge_ints, "max_retries_per_segment": edge_ints,
        "max_erased_fraction": number, "score": st.sampled_from(["mean_nll", "max_nll", "x"]),
        "retry_temperature": number, "answer_marker": text}))
    common = {
        "model": st.sampled_from(["tiny", "", "other", None]), "max_tokens": st.one_of(
            st.none(), edge_ints), "temperature": number, "top_p": number, "top_k": edge_ints,
        "min_p": number, "n": edge_ints, "seed": edge_ints, "stream": st.booleans(),
        "stream_options": st.one_of(anything, st.just({"include_usage": True})),
        "stop": st.one_of(text, st.lists(text, max_size=70)),
        "stop_token_ids": st.one_of(token_ids, st.lists(st.integers(), max_size=1100)),
        "ignore_eos": st.booleans(), "min_tokens": edge_ints, "logprobs": st.one_of(
            edge_ints, st.booleans()), "presence_penalty": number, "frequency_penalty": number,
        "logit_bias": anything, "user": text, "healing": healing,
        "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
        "bogus_field": anything,
    }
    completion = st.fixed_dictionaries(
        {"prompt": st.one_of(text, token_ids, st.lists(text, max_size=5),
                             st.lists(token_ids, max_size=4), anything)},
        optional={**common, "echo": st.booleans(), "best_of": edge_ints, "suffix": text})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant",
                                                              "tool", "x"]),
                                     "content": st.one_of(text, anything)})
    chat = st.fixed_dictionaries(
        {"messages": st.one_of(st.lists(message, max_size=4), anything)},
        optional={**common, "top_logprobs": edge_ints, "max_completion_tokens": edge_ints})
    return st.one_of(st.tuples(st.just("/v1/completions"), completion),
                     st.tuples(st.just("/v1/chat/completions"), chat))


def raw_bodies(big_bytes: int = 3_000_000) -> list[bytes]:
    """Hostile raw bodies that no JSON generator makes: deep nesting, huge numbers, strings
    and arrays (``big_bytes`` long), invalid encodings, NaN, lone surrogates."""
    return [
        b"[" * 100_000 + b"]" * 100_000, b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}",
        b'{"prompt": "a", "temperature": NaN}', b'{"prompt": "a", "temperature": Infinity}',
        b'{"prompt": "a", "top_p": 1e999}', b'{"prompt": "\xff\xfe"}', b"\x00" * 1000,
        b'{"prompt": "' + b"x" * big_bytes + b'"}',
        b'{"prompt": "a"' + b', "n": 1' * (big_bytes // 300) + b"}",
        b'{"prompt": "\\ud800"}', b'{"prompt": "a", "stop": ["\\udfff"]}',
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"prompt": [' + b"1," * (big_bytes // 30) + b"1]}", b"",
        b'{"prompt": "a", "stop": ["' + b'", "'.join([b"x"] * 5000) + b'"]}', b"null", b"[]",
        b'"prompt"', b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
    ]


def check_response(status: int, content: bytes, stats: dict, label: str) -> None:
    """Count one response: its status, a 5xx, an error body not in OpenAI's shape, and in a
    200 stream, error events (a 500 inside the stream counts as a 5xx)."""
    stats["cases"] += 1
    stats["by_status"][str(status)] = stats["by_status"].get(str(status), 0) + 1
    bad = None
    if status >= 500:
        stats["server_errors"] += 1
        bad = "5xx"
    if status >= 400:
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        if not is_openai_error(body):
            stats["bad_error_shape"] += 1
            bad = bad or "shape"
    elif content.startswith(b"data: "):
        for line in content.split(b"\n"):
            if line.startswith(b'data: {"error"'):
                event = json.loads(line[6:])
                if not is_openai_error(event):
                    stats["bad_error_shape"] += 1
                    bad = "stream shape"
                elif event["error"]["type"] == "internal_error":
                    stats["server_errors"] += 1
                    bad = "stream 5xx"
    if bad is not None and len(stats["examples"]) < 20:
        stats["examples"].append({"case": label, "problem": bad, "status": status,
                                  "body": content[:300].decode(errors="replace")})


def run_fuzz(url: str, api_key: str, admin_key: str, num_cases: int, time_limit_s: float,
             seed: int = 0, big_bytes: int = 3_000_000) -> dict:
    """About ``num_cases`` requests (3/4 schemathesis, 1/4 hypothesis bodies and raw bodies),
    spread over every operation and three key sets, at most ``time_limit_s``."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    stats = {"cases": 0, "by_status": {}, "server_errors": 0, "bad_error_shape": 0,
             "examples": [], "operations": 0, "by_source": {}}
    deadline = time.monotonic() + time_limit_s
    keys = {"no key": {}, "api key": {"Authorization": f"Bearer {api_key}"},
            "admin key": {"Authorization": f"Bearer {admin_key}"}}
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    stats["operations"] = len(operations)
    runs = [(op, mode, k) for op in operations for mode in GenerationMode for k in keys]
    per_run = max(1, (3 * num_cases // 4) // len(runs))
    session = httpx.Client(base_url=url, timeout=60)

    def limited(fn):
        return settings(max_examples=per_run, database=None, deadline=None,
                        phases=[Phase.generate], derandomize=False,
                        suppress_health_check=list(HealthCheck))(fn)

    for op, mode, key in runs:
        if time.monotonic() > deadline:
            break
        label = f"{op.method.upper()} {op.path} {mode.value} {key}"

        @limited
        @given(case=op.as_strategy(generation_mode=mode))
        def one(case):
            if time.monotonic() > deadline:
                return
            try:
                r = case.call(base_url=url, headers=keys[key], timeout=60)
            except Exception as exc:  # a transport error is a finding too
                stats["examples"].append({"case": label, "problem": repr(exc)[:300]})
                stats["transport_errors"] = stats.get("transport_errors", 0) + 1
                return
            check_response(r.status_code, r.content, stats, label)

        try:
            one()
        except Exception:  # Unsatisfiable: an operation with nothing to vary (GET /health)
            pass
    stats["by_source"]["schemathesis"] = stats["cases"]
    stats["schemathesis_s"] = round(time_limit_s - (deadline - time.monotonic()), 1)

    def post(path: str, body: bytes, headers: dict, label: str) -> None:
        try:
            r = session.post(path, content=body, headers={**headers,
                                                          "Content-Type": "application/json"})
        except httpx.TransportError as exc:
            stats["examples"].append({"case": label, "problem": repr(exc)[:300]})
            stats["transport_errors"] = stats.get("transport_errors", 0) + 1
            return
        check_response(r.status_code, r.content, stats, label)

    rng = random.Random(seed)
    for body in raw_bodies(big_bytes):
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/feedback", "/tokenize"):
            post(path, body, keys["api key"], f"raw {path} {body[:40]!r}")
    stats["by_source"]["raw"] = stats["cases"] - stats["by_source"]["schemathesis"]
    stats["raw_s"] = round(time_limit_s - (deadline - time.monotonic()), 1)

    bodies_left = max(1, num_cases - stats["cases"])

    @settings(max_examples=bodies_left, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=body_strategy())
    def bodies(case):
        if time.monotonic() > deadline:
            return
        path, body = case
        key = rng.choice(["api key", "api key", "api key", "no key"])
        post(path, json.dumps(body, allow_nan=True).encode(), keys[key],
             f"body {path} {json.dumps(body)[:200]}")

    bodies()
    stats["by_source"]["hypothesis bodies"] = stats["cases"] - sum(stats["by_source"].values())
    r = session.post("/v1/completions", json={"prompt": "ab", "max_tokens": 4},
                     headers=keys["api key"])
    stats["normal_request_after"] = r.status_code
    session.close()
    return stats


# -- 2. overload -----------------------------------------------------------------------------

async def run_overload(url: str, pid: int, num_clients: int, duration_s: float, max_tokens: int,
                       headers: dict | None = None) -> dict:
    """``num_clients`` clients send completions back to back for ``duration_s``; a refused
    one waits ``Retry-After`` (capped at 0.2 s, to keep the pressure on) and tries again."""
    latencies, statuses, problems = [], {}, []
    deadline = time.monotonic() + duration_s
    sampler, stop = Sampler(pid), asyncio.Event()
    body = {"prompt": "overload", "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": 0.8}

    async def client(c: httpx.AsyncClient, i: int) -> None:
        while time.monotonic() < deadline:
            start = time.monotonic()
            r = await c.post("/v1/completions", json={**body, "seed": i}, headers=headers)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append(time.monotonic() - start)
                if r.json()["usage"]["completion_tokens"] != max_tokens:
                    problems.append("short completion")
            elif r.status_code == 503:
                if "retry-after" not in r.headers or r.json()["error"]["code"] != "queue_full":
                    problems.append(f"503 without Retry-After/queue_full: {r.text[:200]}")
                await asyncio.sleep(min(0.2, float(r.headers.get("retry-after", 1))))
            else:
                problems.append(f"{r.status_code}: {r.text[:200]}")

    before = usage(pid)
    monitor = asyncio.create_task(sampler.run(stop))
    limits = httpx.Limits(max_connections=num_clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=duration_s + 120, limits=limits) as c:
        await asyncio.gather(*(client(c, i) for i in range(num_clients)))
    stop.set()
    await monitor
    idle = wait_idle(url)
    total = sum(statuses.values())
    return {"clients": num_clients, "duration_s": duration_s, "requests": total,
            "status_counts": {str(k): v for k, v in statuses.items()},
            "share_503": round(statuses.get(503, 0) / max(1, total), 3),
            "admitted": statuses.get(200, 0),
            "admitted_p50_s": round(percentile(latencies, 0.5), 3),
            "admitted_p99_s": round(percentile(latencies, 0.99), 3),
            "rss_before_mib": before["rss_mib"], "rss_peak_mib": sampler.peak(),
            "rss_after_mib": usage(pid)["rss_mib"], "engine_after": idle,
            "problems": problems[:20], "num_problems": len(problems)}


# -- 3. disconnect storm ---------------------------------------------------------------------

DROP_POINTS = ("before_response", "after_headers", "after_events", "after_delay", "complete")


async def storm_client(url: str, i: int, rng: random.Random, max_tokens: int, headers: dict,
                       deadline: float) -> dict:
    """One streaming request with forced healing, dropped at a random point (or read to the
    end). A 503 (queue full) is retried after a short pause, until ``deadline``."""
    point = rng.choice(DROP_POINTS)
    reset = rng.random() < 0.5
    body = {"prompt": f"storm {i}", "stream": True, "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 1.0, "seed": i, "healing": FORCE_HEALING}
    while True:
        reader, writer = await open_request(url, "/v1/completions", body,
                                            {**headers, "Connection": "close"})
        if point == "before_response":
            await asyncio.sleep(rng.uniform(0, 0.05))
            hang_up(writer, reset)
            return {"point": point, "events": 0, "done": False, "refused": 0}
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split()[1])
        if status == 503 and time.monotonic() < deadline:
            hang_up(writer, False)
            await asyncio.sleep(rng.uniform(0.02, 0.1))
            continue
        if status != 200:
            hang_up(writer, False)
            return {"point": point, "events": 0, "done": False, "status": status}
        break
    events, done, data = 0, False, b""
    limit_events = rng.randint(1, max(1, max_tokens // 4)) if point == "after_events" else None
    stop_at = time.monotonic() + rng.uniform(0, 1.0) if point == "after_delay" else None
    while point != "after_headers":
        try:
            timeout = None if stop_at is None else max(0.0, stop_at - time.monotonic())
            chunk = await asyncio.wait_for(reader.read(4096), timeout)
        except asyncio.TimeoutError:
            break
        if not chunk:
            break
        data += chunk
        events = data.count(b"data: ")
        done = b"data: [DONE]" in data
        if done or (limit_events is not None and events >= limit_events):
            break
    hang_up(writer, reset)
    return {"point": point, "events": events, "done": done,
            "stream_error": b'data: {"error"' in data}


async def run_storm(url: str, num_clients: int, max_tokens: int, seed: int = 0,
                    headers: dict | None = None, time_limit_s: float = 300.0) -> dict:
    headers = headers or {}
    before = scrape(url)
    rng = random.Random(seed)
    deadline = time.monotonic() + time_limit_s
    start = time.monotonic()
    results = await asyncio.gather(*(storm_client(url, i, random.Random(rng.random()),
                                                  max_tokens, headers, deadline)
                                     for i in range(num_clients)), return_exceptions=True)
    wall_s = time.monotonic() - start
    crashed = [repr(r) for r in results if isinstance(r, BaseException)]
    results = [r for r in results if not isinstance(r, BaseException)]
    idle = wait_idle(url)
    time.sleep(0.5)  # the last aborts' counters
    after = scrape(url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    finished = sum(delta(f"e3rl_requests_total{{finish_reason={r}}}") for r in ("stop", "length"))
    aborted = delta("e3rl_requests_total{finish_reason=abort}")
    completed = sum(r["done"] for r in results)
    saw_events = sum(r["events"] > 0 and not r["done"] for r in results)
    points = {p: sum(r["point"] == p for r in results) for p in DROP_POINTS}
    e2e = delta("e3rl_e2e_request_latency_seconds_count")
    stored = delta("e3rl_trajectories_written_total")
    # Every request the engine saw ended once: finished or aborted; a finished request is
    # stored and timed once; an aborted one neither.
    consistent = (finished >= completed and finished + aborted >= completed + saw_events
                  and finished + aborted <= num_clients and e2e == finished
                  and stored == finished)
    return {"clients": num_clients, "wall_s": round(wall_s, 1), "drop_points": points,
            "completed": completed, "dropped_mid_stream": saw_events,
            "stream_errors": sum(r.get("stream_error", False) for r in results),
            "other_status": [r["status"] for r in results if "status" in r],
            "client_exceptions": crashed[:5],
            "server_finished": finished, "server_aborted": aborted, "e2e_counted": e2e,
            "trajectories_stored": stored, "erasures": delta("e3rl_erasures_total"),
            "counters_consistent": consistent, "engine_after": idle,
            "blocks_leaked": idle["blocks_leaked"]}


# -- 4. slow clients -------------------------------------------------------------------------

async def measure_throughput(url: str, num_clients: int, duration_s: float, max_tokens: int,
                             headers: dict) -> float:
    """Streamed completion tokens per second of ``num_clients`` well-behaved clients."""
    tokens = 0
    deadline = time.monotonic() + duration_s
    body = {"prompt": "fast", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": 0.8}

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal tokens
        while time.monotonic() < deadline:
            async with c.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                if r.status_code == 503:  # queue full: the test server has few slots
                    await asyncio.sleep(0.05)
                    continue
                assert r.status_code == 200, r.status_code
                async for line in r.aiter_lines():
                    if line.startswith('data: {') and '"usage": {' in line:
                        tokens += json.loads(line[6:])["usage"]["completion_tokens"]

    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        await asyncio.gather(*(client(c) for _ in range(num_clients)))
    return tokens / (time.monotonic() - start)


async def run_slow(url: str, pid: int, num_slow: int, num_fast: int, phase_s: float,
                   slow_max_tokens: int, fast_max_tokens: int, headers: dict | None = None,
                   n: int = 4) -> dict:
    """Fast clients' throughput alone, then with ``num_slow`` trickling (a byte every 10 ms)
    and ``num_slow`` never-reading clients (small receive buffer) holding long streams with
    ``n`` samples and top-5 logprobs each, once those have been generated (a slow reader's
    request runs like any other while it generates; the question is what its unread output
    costs afterwards); the server's memory against the bytes left unread (read out at the
    end)."""
    headers = headers or {}
    await measure_throughput(url, num_fast, min(2.0, phase_s), fast_max_tokens, headers)  # warm
    alone = await measure_throughput(url, num_fast, phase_s, fast_max_tokens, headers)
    rss_before, server_before = usage(pid)["rss_mib"], usage(pid)["server_rss_mib"]
    body = {"prompt": "slow", "stream": True, "max_tokens": slow_max_tokens, "n": n,
            "logprobs": 5, "ignore_eos": True, "temperature": 1.0}
    trickle_bytes = 0
    stop = asyncio.Event()

    async def trickle() -> None:
        nonlocal trickle_bytes
        reader, writer = await open_request(url, "/v1/completions", body, headers, rcvbuf=4096)
        while not stop.is_set():
            if not await reader.read(1):
                break
            trickle_bytes += 1
            await asyncio.sleep(0.01)
        hang_up(writer, True)

    sleepers = [await open_request(url, "/v1/completions", body, headers, rcvbuf=4096)
                for _ in range(num_slow)]
    trickles = [asyncio.create_task(trickle()) for _ in range(num_slow)]
    sampler, sampling = Sampler(pid), asyncio.Event()
    monitor = asyncio.create_task(sampler.run(sampling))
    # Their generations end (nothing runs, every block free) while their connections stay
    # open with the output unread: from then on they cost the engine nothing.
    held = await asyncio.to_thread(wait_idle, url, 120.0)
    with_slow = await measure_throughput(url, num_fast, phase_s, fast_max_tokens, headers)
    rss_held, server_held = usage(pid)["rss_mib"], usage(pid)["server_rss_mib"]
    sampling.set()
    await monitor
    unread = num_cut = 0
    for reader, writer in sleepers:  # read what was held back, to count it
        tail = b""
        while b"data: [DONE]" not in tail:
            try:
                chunk = await asyncio.wait_for(reader.read(1 << 16), 10)
            except asyncio.TimeoutError:
                break
            if not chunk:
                break
            unread += len(chunk)
            tail = (tail + chunk)[-64:]
        num_cut += b"data: [DONE]" not in tail  # closed by the server (MAX_UNSENT_TOKENS)
        hang_up(writer, False)
    stop.set()
    await asyncio.gather(*trickles)
    idle = wait_idle(url)
    return {"slow_clients": 2 * num_slow, "fast_clients": num_fast, "phase_s": phase_s,
            "fast_tok_s_alone": round(alone, 1), "fast_tok_s_with_slow": round(with_slow, 1),
            "throughput_ratio": round(with_slow / alone, 3) if alone else None,
            "unread_mib": round(unread / 2**20, 2), "trickled_bytes": trickle_bytes,
            "never_read_cut_by_server": num_cut,
            "rss_before_mib": rss_before, "rss_peak_mib": sampler.peak(),
            "rss_holding_mib": rss_held, "slow_generations_done": held["is_idle"],
            "server_rss_before_mib": server_before, "server_rss_holding_mib": server_held,
            "rss_growth_per_unread_mib": round((rss_held - rss_before) / max(unread / 2**20,
                                                                             1e-9), 2),
            "engine_after": idle}


# -- 5. soak ---------------------------------------------------------------------------------

async def run_soak(url: str, pid: int, duration_s: float, swap_every_s: float,
                   checkpoints: list[bytes], api_headers: dict, admin_headers: dict,
                   num_clients: int = 4, warmup_s: float | None = None, seed: int = 0) -> dict:
    """Mixed traffic for ``duration_s`` with a weight upload every ``swap_every_s``."""
    rng = random.Random(seed)
    deadline = time.monotonic() + duration_s
    warmup_s = duration_s * 0.2 if warmup_s is None else warmup_s
    counts = {"requests": 0, "feedback": 0, "swaps": 0}
    errors: list[str] = []
    samples: list[dict] = []

    def request_body(kind: str) -> tuple[str, dict]:
        base = {"max_tokens": rng.randint(4, 48), "temperature": rng.choice([0.0, 0.8, 1.0])}
        if kind == "heal":
            return "/v1/completions", {**base, "prompt": "heal", "healing": FORCE_HEALING,
                                       "temperature": 1.0}
        if kind == "chat":
            return "/v1/chat/completions", {**base, "messages": [{"role": "user",
                                                                  "content": "hi"}]}
        if kind == "n":
            return "/v1/completions", {**base, "prompt": "many", "n": 2, "temperature": 1.0}
        return "/v1/completions", {**base, "prompt": f"soak {rng.random()}",
                                   "logprobs": rng.choice([None, 2])}

    async def client(c: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            kind = rng.choice(["plain", "heal", "chat", "n", "stream"])
            path, body = request_body("plain" if kind == "stream" else kind)
            if kind == "stream":
                async with c.stream("POST", path, json={**body, "stream": True},
                                    headers=api_headers) as r:
                    text = (await r.aread()).decode()
                ok = r.status_code == 200 and text.endswith("data: [DONE]\n\n") \
                    and '"error"' not in text
                counts["requests"] += 1
                if not ok:
                    errors.append(f"stream {r.status_code}: {text[-200:]}")
                continue
            r = await c.post(path, json=body, headers=api_headers)
            counts["requests"] += 1
            if r.status_code != 200:
                errors.append(f"{path} {r.status_code}: {r.text[:200]}")
                continue
            if rng.random() < 0.5:  # feedback on half of them
                fb = await c.post("/v1/feedback", headers=api_headers, json={
                    "id": r.json()["id"], "index": 0, "reward": rng.choice([0.0, 1.0])})
                counts["feedback"] += 1
                if fb.status_code != 200:
                    errors.append(f"feedback {fb.status_code}: {fb.text[:200]}")

    async def swapper(c: httpx.AsyncClient) -> None:
        version = 0
        while time.monotonic() + swap_every_s < deadline:
            await asyncio.sleep(swap_every_s)
            version += 1
            r = await c.post("/v1/admin/weights/upload", params={"version": str(version)},
                             content=checkpoints[version % len(checkpoints)],
                             headers={**admin_headers,
                                      "Content-Type": "application/octet-stream"})
            counts["swaps"] += 1
            if r.status_code != 200:
                errors.append(f"upload {r.status_code}: {r.text[:200]}")

    async def sampler() -> None:
        start = time.monotonic()
        while time.monotonic() < deadline:
            samples.append({"t_s": round(time.monotonic() - start, 1), **usage(pid)})
            await asyncio.sleep(min(5.0, max(0.5, duration_s / 40)))
        samples.append({"t_s": round(time.monotonic() - start, 1), **usage(pid)})

    limits = httpx.Limits(max_connections=num_clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        await asyncio.gather(sampler(), swapper(c), *(client(c) for _ in range(num_clients)))
    idle = wait_idle(url)
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples
    first, last = after[0], usage(pid)
    version = httpx.get(f"{url}/v1/admin/weights", headers=admin_headers, timeout=30).json()
    return {"duration_s": duration_s, "swap_every_s": swap_every_s, **counts,
            "errors": len(errors), "error_examples": errors[:10], "warmup_s": warmup_s,
            "start": first, "end": last, "peak_rss_mib": max(s["rss_mib"] for s in after),
            "rss_drift_mib": round(last["rss_mib"] - first["rss_mib"], 1),
            "fd_drift": last["fds"] - first["fds"],
            "thread_drift": last["threads"] - first["threads"], "samples": samples,
            "weights_version_after": version.get("version"), "engine_after": idle}


# -- the command line ------------------------------------------------------------------------

def serve(model: Path, data_dir: str, *extra: str, log_path: str | None = None,
          timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """``e3rl serve`` on a free loopback port, its output appended to ``log_path`` (a pipe
    nobody reads would fill up and stall the server); returns it and its URL once ready."""
    port = free_port()
    log_path = log_path or os.path.join(data_dir, "serve.log")
    cmd = [sys.executable, "-m", "e3rl.server.cli", "serve", "--model", str(model),
           "--data-dir", data_dir, "--num-threads", "1", "--log-level", "warning",
           "--no-access-log", *extra, "--port", str(port)]
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"e3rl serve exited: {Path(log_path).read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("e3rl serve did not become ready")
        time.sleep(0.2)


def stop(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except Exception:
        proc.kill()


def report(name: str, result: dict) -> None:
    shown = {k: v for k, v in result.items() if k not in ("samples", "examples")}
    print(f"== {name}: {json.dumps(shown, indent=None, default=str)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("items", nargs="*", default=["fuzz", "overload", "storm", "slow", "soak"],
                    help="which attacks to run (default: all five)")
    ap.add_argument("--fuzz-cases", type=int, default=10_000)
    ap.add_argument("--fuzz-time-s", type=float, default=1800)
    ap.add_argument("--overload-s", type=float, default=60)
    ap.add_argument("--overload-seqs", type=int, default=4, help="--max-num-seqs = --max-waiting")
    ap.add_argument("--storm-clients", type=int, default=500)
    ap.add_argument("--slow-clients", type=int, default=4, help="of each kind")
    ap.add_argument("--slow-n", type=int, default=32, help="samples per slow request (480 "
                    "tokens each, top-5 log-probs)")
    ap.add_argument("--slow-phase-s", type=float, default=20)
    ap.add_argument("--soak-s", type=float, default=600)
    ap.add_argument("--swap-every-s", type=float, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    model, other = tiny_models()
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "model": "tiny qwen3",
                     "cores": os.cpu_count(), "args": vars(args)}
    work = tempfile.mkdtemp(prefix="e3rl-reliability-")
    ckpts = Path(work) / "ckpts"
    ckpts.mkdir()
    keys = ["--api-key", "api-k", "--admin-key", "admin-k", "--checkpoint-dir", str(ckpts)]
    api, admin = {"Authorization": "Bearer api-k"}, {"Authorization": "Bearer admin-k"}
    for item in args.items:
        data = tempfile.mkdtemp(dir=work)
        extra = {"fuzz": [*keys, "--max-model-len", "64"],
                 "overload": ["--max-num-seqs", str(args.overload_seqs), "--max-waiting",
                              str(args.overload_seqs)],
                 "storm": ["--max-num-seqs", "64", "--max-waiting", "1024"],
                 "slow": ["--num-kv-blocks", "4096"], "soak": keys}[item]
        proc, url = serve(model, data, *extra)
        try:
            with LoadMonitor(proc.pid) as load:
                if item == "fuzz":
                    result = run_fuzz(url, "api-k", "admin-k", args.fuzz_cases,
                                      args.fuzz_time_s, args.seed)
                elif item == "overload":
                    clients = 4 * 2 * args.overload_seqs
                    result = asyncio.run(run_overload(url, proc.pid, clients, args.overload_s,
                                                      max_tokens=32))
                elif item == "storm":
                    result = asyncio.run(run_storm(url, args.storm_clients, max_tokens=64,
                                                   seed=args.seed))
                elif item == "slow":
                    result = asyncio.run(run_slow(url, proc.pid, args.slow_clients, 4,
                                                  args.slow_phase_s, slow_max_tokens=480,
                                                  fast_max_tokens=64, n=args.slow_n))
                else:
                    blobs = [(p / "model.safetensors").read_bytes() for p in (other, model)]
                    result = asyncio.run(run_soak(url, proc.pid, args.soak_s,
                                                  args.swap_every_s, blobs, api, admin,
                                                  seed=args.seed))
            result["other_load"] = round(load.other_share, 3)
            result["load_note"] = load.note()
        finally:
            stop(proc)
        result["server_exit_code"] = proc.returncode
        results[item] = result
        report(item, result)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    sys.exit(0)


if __name__ == "__main__":
    main()
