"""Parts of ``e3rl train follow`` that need no server: replica discovery, the trainer's
/metrics and /health, and the command line's errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from e3rl.trainer.config import FollowConfig
from e3rl.trainer.fleet import ReplicaError, discover
from e3rl.trainer.follow_metrics import HealthServer, TrainerMetrics


def config(**overrides) -> FollowConfig:
    return FollowConfig(**{"model": "m", "state_dir": "s", **overrides})


def test_discovery_from_flags_a_file_and_dns(tmp_path):
    listing = tmp_path / "servers.txt"
    listing.write_text("# replicas\nhttp://10.0.0.2:8000/\n\nhttp://10.0.0.1:8000\n")
    c = config(servers=["http://10.0.0.1:8000"], servers_file=str(listing),
               servers_dns="localhost:8123")
    urls = discover(c)
    assert urls[:2] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]  # deduplicated
    assert "http://127.0.0.1:8123" in urls[2:]
    listing.write_text("http://10.0.0.3:8000\n")  # re-read on every call
    assert "http://10.0.0.3:8000" in discover(c)
    listing.unlink()
    with pytest.raises(ReplicaError, match="cannot read --servers-file"):
        discover(c)


@pytest.mark.parametrize("overrides,message", [
    ({}, "name the servers to follow"),
    ({"servers": ["10.0.0.1:8000"]}, "must start with http"),
    ({"servers_dns": "no-port"}, "HOST:PORT"),
    ({"servers": ["http://a:1"], "signals": "rewards,vibes"}, "signals must name"),
    ({"servers": ["http://a:1"], "batch_size": 0}, "batch_size must be >= 1"),
    ({"servers": ["http://a:1"], "min_entropy_ratio": 2.0}, "min_entropy_ratio"),
])
def test_bad_configs_say_why(overrides, message):
    with pytest.raises(ValueError, match=message):
        config(**overrides)


def test_metrics_and_health():
    metrics = TrainerMetrics()
    server = HealthServer(metrics, "127.0.0.1", 0, stall_timeout_s=0.3)
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        metrics.push_failures.labels("http://b:1").inc()
        metrics.replicas_behind.set(1)
        text = httpx.get(f"{url}/metrics").text
        assert 'e3rl_trainer_push_failures_total{server="http://b:1"} 1.0' in text
        assert "e3rl_trainer_replicas_behind 1.0" in text
        server.beat()
        r = httpx.get(f"{url}/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        time.sleep(0.4)  # no poll completed within the stall timeout
        r = httpx.get(f"{url}/health")
        assert r.status_code == 503 and r.json()["status"] == "stalled"
        assert httpx.get(f"{url}/other").status_code == 404
    finally:
        server.close()


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "e3rl.trainer.cli", "train", "follow", *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_cli_errors_are_one_line(tmp_path):
    base = ["--server", "http://127.0.0.1:9", "--model", "m", "--state-dir", str(tmp_path)]
    no_key = {k: v for k, v in os.environ.items() if k != "E3RL_ADMIN_KEY"}
    r = subprocess.run([sys.executable, "-m", "e3rl.trainer.cli", "train", "follow", *base],
                       capture_output=True, text=True, timeout=120, env=no_key)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "E3RL_ADMIN_KEY" in r.stderr
    r = run_cli("--model", "m", "--state-dir", str(tmp_path), env={"E3RL_ADMIN_KEY": "k"})
    assert r.returncode == 2 and "name the servers to follow" in r.stderr
    r = run_cli(*base[:2], "--model", str(tmp_path / "missing"), "--state-dir",
                str(tmp_path / "s"), env={"E3RL_ADMIN_KEY": "k"})
    assert r.returncode == 2 and r.stderr.startswith("e3rl: error: --model: no model directory")
    assert r.stderr.strip().count("\n") == 0, r.stderr
