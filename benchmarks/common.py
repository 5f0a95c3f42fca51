"""Shared benchmark helpers: the model, the workload, and a check for other CPU load."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from e3rl.engine.model_factory import BENCH_QWEN3_100M, build_random_model

CACHE = Path("/tmp/e3rl-bench")


def bench_model(config: dict | None = None, name: str = "qwen3-100m") -> Path:
    """The ~100M Qwen3-shaped random model (built once, cached under /tmp)."""
    path = CACHE / name
    if not (path / "config.json").exists():
        build_random_model(path, config or BENCH_QWEN3_100M, seed=0)
    return path


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)


def mixed_workload(num_requests: int = 32, prompt_range=(16, 512), output_range=(16, 256),
                   vocab: int = 32000, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(*prompt_range))]
               for _ in range(num_requests)]
    return Workload(prompts, [rng.randint(*output_range) for _ in range(num_requests)])


def model_workload(model: Path, num_requests: int, prompt_range: str,
                   output_range: str) -> Workload:
    """``mixed_workload`` over the vocabulary of the model at ``model``, with the ranges as the
    scripts' command lines give them ("16,64")."""
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    return mixed_workload(num_requests, tuple(map(int, prompt_range.split(","))),
                          tuple(map(int, output_range.split(","))), vocab=vocab)


class LoadMonitor:
    """CPU used by *other* processes during a run (not this one, not ``pids``, e.g. a server
    under test), as a share of all cores. On two cores, another busy process can slow torch
    by up to 100x: results under load are not comparable."""

    def __init__(self, *pids: int):
        self.pids = [os.getpid(), *pids]

    def _ours(self) -> float:
        """CPU seconds of this process, of ``pids`` and of their children (a server's
        engine-core process)."""
        procs: dict[int, psutil.Process] = {}
        for pid in self.pids:
            try:
                proc = psutil.Process(pid)
                for p in [proc, *proc.children(recursive=True)]:
                    procs[p.pid] = p  # once each: a pid given may also be our child
            except psutil.NoSuchProcess:
                pass
        total = 0.0
        for p in procs.values():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) \
            + getattr(t, "softirq", 0.0)

    def __enter__(self):
        self._busy0, self._ours0, self._t0 = self._busy(), self._ours(), time.monotonic()
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self._t0
        other = (self._busy() - self._busy0) - (self._ours() - self._ours0)
        self.other_share = max(0.0, other) / (wall * psutil.cpu_count())
        return False

    def note(self) -> str:
        flag = "  WARNING: machine not quiet" if self.other_share > 0.10 else ""
        return f"other load {100 * self.other_share:.0f}%{flag}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(serve_args: list[str], timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """``e3rl serve SERVE_ARGS --port FREE`` in a subprocess; returns it and its URL once
    ``/ready`` answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "e3rl.server.cli", "serve", *serve_args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not become ready")
        time.sleep(0.2)
