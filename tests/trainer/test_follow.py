"""The serve -> train -> swap loop on loopback: real ``e3rl serve`` processes with healing,
traffic with and without feedback, ``e3rl train follow`` pulling from every replica and
pushing the weights back by upload."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from e3rl.trainer.arith import format_prompt, iter_problems
from e3rl.trainer.grading import grade_arith
from tests.conftest import hf_greedy
from tests.server.conftest import start_serve_process

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "models" / "arith-chain"
ADMIN = "admin-key-for-tests"
GREEDY_PROMPTS = ["Q: 12+34-5\nA:\n", "Q: 77-19+8\nA:\n"]


def serve(tmp: Path, name: str) -> tuple[subprocess.Popen, str]:
    (tmp / f"ckpt-{name}").mkdir(exist_ok=True)
    return start_serve_process(
        ["--model", str(BUNDLED), "--admin-key", ADMIN, "--data-dir", str(tmp / f"data-{name}"),
         "--checkpoint-dir", str(tmp / f"ckpt-{name}"), "--num-threads", "1",
         "--kv-cache-memory-gb", "0.05"], log_path=tmp / f"serve-{name}.log")


def follow_cmd(state: Path, servers_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "e3rl.trainer.cli", "train", "follow",
            "--servers-file", str(servers_file), "--model", str(BUNDLED),
            "--state-dir", str(state), "--batch-size", "8", "--settled-s", "0",
            "--poll-interval-s", "0.2", "--lr", "1e-4", "--num-threads", "1",
            "--push-retries", "2", "--request-timeout-s", "10", *extra]


def run_follow(cmd: list[str], log: Path, timeout_s: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "E3RL_ADMIN_KEY": ADMIN, "OMP_NUM_THREADS": "1"}
    with open(log, "a") as out:
        return subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout_s)


def traffic(urls: list[str], num: int, seed: int, feedback_every: int = 2) -> dict:
    """``num`` sampled, healed requests spread over ``urls``; feedback (the graded reward) on
    every ``feedback_every``-th."""
    problems = iter_problems("train", seed)
    counts = {"requests": 0, "feedback": 0, "erasures": 0, "failed": 0}
    with httpx.Client(timeout=60) as client:
        for i in range(num):
            url, problem = urls[i % len(urls)], next(problems)
            r = client.post(f"{url}/v1/completions", json={
                "prompt": format_prompt(problem.question), "max_tokens": 64,
                "temperature": 1.0, "seed": seed * 100_000 + i})
            if r.status_code != 200:
                counts["failed"] += 1
                continue
            data = r.json()
            counts["requests"] += 1
            counts["erasures"] += data["choices"][0]["e3rl"]["num_erasures"]
            if i % feedback_every == 0:
                reward = float(grade_arith(data["choices"][0]["text"], problem.answer))
                f = client.post(f"{url}/v1/feedback",
                                json={"id": data["id"], "index": 0, "reward": reward})
                assert f.status_code == 200, f.text
                counts["feedback"] += 1
    return counts


def versions(url: str) -> tuple[str, str, float]:
    """(``/v1/models`` version, a completion's fingerprint, ``e3rl_weights_version``)."""
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["weight_version"]
    fp = httpx.post(f"{url}/v1/completions", json={"prompt": "Q: 1+2\nA:\n", "max_tokens": 4,
                                                   "temperature": 0}).json()
    metric = next(float(line.split()[-1]) for line in httpx.get(f"{url}/metrics").text
                  .splitlines() if line.startswith("e3rl_weights_version"))
    return model, fp["system_fingerprint"], metric


def greedy(url: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED)
    out = []
    for prompt in GREEDY_PROMPTS:
        r = httpx.post(f"{url}/v1/completions", json={
            "prompt": tok(prompt)["input_ids"], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}).json()
        out.append(r["choices"][0]["text"])
    return out


def hf_text(path: Path) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED)
    ids = [tok(p)["input_ids"] for p in GREEDY_PROMPTS]
    return [tok.decode(o, skip_special_tokens=True) for o in hf_greedy(path, ids, 12)]


def ledger(state: Path) -> list[dict]:
    return [json.loads(line) for line in (state / "ledger.jsonl").read_text().splitlines()]


def all_ids(url: str) -> list[str]:
    r = httpx.get(f"{url}/v1/trajectories", params={"limit": 10_000},
                  headers={"Authorization": f"Bearer {ADMIN}"})
    return [rec["id"] for rec in r.json()["data"]]


@pytest.fixture
def fleet(tmp_path):
    procs = {}
    for name in ("a", "b"):
        procs[name] = serve(tmp_path, name)
    yield tmp_path, procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_loop_end_to_end(fleet):
    tmp, procs = fleet
    urls = [procs["a"][1], procs["b"][1]]
    servers = tmp / "servers.txt"
    servers.write_text("\n".join(urls) + "\n")
    before = greedy(urls[0])
    counts = traffic(urls, 24, seed=1)
    assert counts["failed"] == 0 and counts["feedback"] == 12
    state = tmp / "state"
    # Traffic keeps running while the trainer updates and pushes: none of it may fail.
    stop, during = threading.Event(), []

    def background() -> None:
        while not stop.is_set():
            during.append(traffic(urls, 2, seed=2 + len(during), feedback_every=10**6))

    thread = threading.Thread(target=background)
    thread.start()
    try:
        done = run_follow(follow_cmd(state, servers, "--max-updates", "1",
                                     "--metrics-port", "0"), tmp / "follow.log")
    finally:
        stop.set()
        thread.join()
    log = (tmp / "follow.log").read_text()
    assert done.returncode == 0, log[-3000:]
    record = json.loads((state / "follow_log.jsonl").read_text().splitlines()[-1])
    assert record["outcome"] == "pushed", record
    assert record["signals"].get("reward", 0) > 0
    assert all(v == "ok" for v in record["push"].values()) and len(record["push"]) == 2
    assert sum(d["requests"] for d in during) >= 2 and all(d["failed"] == 0 for d in during)
    for url in urls:
        assert versions(url) == ("1", "e3rl-w1", 1.0)
    after = greedy(urls[0])
    assert after == greedy(urls[1])
    assert after == hf_text(state / "checkpoints" / "step-000001")
    assert before == hf_text(BUNDLED)
    # The ledger names each trajectory once; the servers acknowledged the committed cursor.
    entry = ledger(state)[0]
    ids = entry["used"] + sum(entry["skipped"].values(), [])
    assert len(ids) == len(set(ids)) and len(entry["used"]) == 8
