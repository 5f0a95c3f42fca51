"""``e3rl serve`` runs its engine in a process of its own: a core that dies is reported
(``/health`` and ``/ready`` 503, requests answered 503 in OpenAI's format, never a hang), and
the server still shuts down cleanly; ``--no-engine-process`` keeps the loop in the server."""

from __future__ import annotations

import signal
import time

import httpx
import psutil

from .conftest import start_serve_process

REQUEST = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}


def _cores(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "e3rl.engine.core" in " ".join(p.cmdline())]


def test_a_killed_engine_core_is_reported_and_the_server_still_stops(tiny_model, tmp_path):
    proc, url = start_serve_process(["--model", str(tiny_model), "--num-kv-blocks", "64",
                                     "--data-dir", str(tmp_path), "--no-access-log"])
    try:
        assert httpx.post(f"{url}/v1/completions", json=REQUEST, timeout=30).status_code == 200
        [core] = _cores(proc.pid)
        core.kill()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/ready", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/ready never reported the dead core"
            time.sleep(0.05)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 503
        r = httpx.post(f"{url}/v1/completions", json=REQUEST, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["code"] == "engine_dead" and error["type"] == "service_unavailable"
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert 'e3rl_engine_alive{model="qwen3"} 0.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait(10)


def test_without_an_engine_process_the_loop_runs_in_the_server(tiny_model, tmp_path):
    proc, url = start_serve_process(["--model", str(tiny_model), "--num-kv-blocks", "64",
                                     "--data-dir", str(tmp_path), "--no-engine-process"])
    try:
        assert _cores(proc.pid) == []
        assert httpx.post(f"{url}/v1/completions", json=REQUEST, timeout=30).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait(10)
