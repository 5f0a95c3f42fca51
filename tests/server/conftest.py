"""Fixtures for the server tests: a shared engine on the tiny Qwen3 model, an in-process
client against the ASGI app, and live uvicorn servers on random loopback ports."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from e3rl.engine.async_engine import AsyncEngine
from e3rl.engine.client import EngineClient
from e3rl.engine.core_client import EngineCoreClient
from e3rl.server.app import create_app
from e3rl.server.settings import Settings

# A pool big enough for every test (256 blocks x 16 tokens), no preemption. The thread count
# is the one tests/conftest.py chose: an engine sets torch's (process-wide) thread count, and
# the server tests must not change it for the test modules that run after them.
ENGINE_OPTIONS = dict(dtype="float32", block_size=16, num_kv_blocks=256, max_num_seqs=64,
                      num_threads=torch.get_num_threads())


# Every app of the session keeps its trajectory store in its own folder under one temporary
# root (never in the working directory), removed when the session ends.
DATA_ROOT = tempfile.mkdtemp(prefix="e3rl-test-data-")
atexit.register(shutil.rmtree, DATA_ROOT, ignore_errors=True)


def make_settings(model_dir, **overrides) -> Settings:
    options = {**ENGINE_OPTIONS, "model": str(model_dir), "served_model_name": "tiny",
               "data_dir": tempfile.mkdtemp(dir=DATA_ROOT), **overrides}
    return Settings(**options)


def make_engine(settings: Settings) -> EngineClient:
    """The engine as ``e3rl serve`` runs it: in a process of its own (``EngineCoreClient``),
    or on a thread of this process with ``engine_process=False`` (``AsyncEngine``, for tests
    that reach into the engine)."""
    kind = EngineCoreClient if settings.engine_process else AsyncEngine
    engine = kind(settings.engine_config())
    engine.start()
    return engine


def start_serve_process(args: list[str], *, env: dict | None = None, log_path=None,
                        timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """A real ``e3rl serve ARGS`` process on a free loopback port, once ``/ready`` answers.
    Its output goes to ``log_path`` (appended) or to a pipe."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "e3rl.server.cli", "serve", *args, "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if log_path is not None:
        with open(log_path, "a") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    else:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            output = open(log_path).read() if log_path is not None else proc.stdout.read()
            raise AssertionError(f"e3rl serve exited: {output[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("e3rl serve did not become ready")
        time.sleep(0.1)


class LiveServer:
    """A real uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app, ready_timeout_s: float = 120.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"uvicorn-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + ready_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the live server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="session")
def settings(tiny_model) -> Settings:
    return make_settings(tiny_model)


@pytest.fixture(scope="session")
def engine(settings):
    """One engine for every in-process test of the session."""
    eng = make_engine(settings)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def client(settings, engine):
    """httpx (Starlette's TestClient) against the ASGI app, sharing the session engine."""
    with TestClient(create_app(settings, engine=engine)) as c:
        yield c


@pytest.fixture(scope="module")
def live(settings):
    """A live uvicorn server whose lifespan loads the model and owns its engine."""
    server = LiveServer(create_app(settings))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llm(tiny_model):
    """The offline engine on the same model: the in-process reference."""
    from e3rl.engine import LLM

    return LLM(str(tiny_model), **{k: v for k, v in ENGINE_OPTIONS.items()
                                   if k != "num_threads"})
