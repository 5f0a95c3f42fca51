"""The serve -> train -> swap loop on loopback: real ``e3rl serve`` processes with healing,
traffic with and without feedback, ``e3rl train follow`` pulling from every replica and
pushing the weights back by upload."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from e3rl.trainer.arith import format_prompt, iter_problems
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
            "--poll-interval-s", "0.2", "--num-threads", "1",
            "--push-retries", "2", "--request-timeout-s", "10", *extra]


def run_follow(cmd: list[str], log: Path, timeout_s: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "E3RL_ADMIN_KEY": ADMIN, "OMP_NUM_THREADS": "1"}
    with open(log, "a") as out:
        return subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout_s)


def traffic(urls: list[str], num: int, seed: int, feedback_every: int = 2) -> dict:
    """``num`` sampled requests (healed: the servers' default) spread over ``urls``; feedback
    on every ``feedback_every``-th (0: none). The rewards are the client's to give: they
    alternate 0, 1, 0, ... over the requests with feedback, so that every batch of the
    trainer holds different rewards (a batch of equal rewards has no advantage to learn
    from) and each test is deterministic."""
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
            if feedback_every and i % feedback_every == 0:
                reward = float((i // feedback_every) % 2)
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


def _fleet(tmp: Path):
    with ThreadPoolExecutor(2) as pool:  # both start at once
        procs = dict(zip("ab", pool.map(lambda name: serve(tmp, name), "ab")))
    yield tmp, procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def fleet(tmp_path):
    """Two fresh replicas for a test that changes their weights or stops one."""
    yield from _fleet(tmp_path)


@pytest.fixture(scope="module")
def quiet_fleet(tmp_path_factory):
    """Two replicas shared by the tests that must leave their weights alone (each test
    follows them with a state dir of its own, so it reads every stored trajectory anew)."""
    yield from _fleet(tmp_path_factory.mktemp("quiet-fleet"))


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
            during.append(traffic(urls, 2, seed=2 + len(during), feedback_every=0))

    threads = [threading.Thread(target=background) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        done = run_follow(follow_cmd(state, servers, "--max-updates", "1",
                                     "--metrics-port", "0"), tmp / "follow.log")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    log = (tmp / "follow.log").read_text()
    assert done.returncode == 0, log[-3000:]
    record = json.loads((state / "follow_log.jsonl").read_text().splitlines()[-1])
    assert record["outcome"] == "pushed", record
    assert record["signals"].get("reward", 0) > 0
    assert all(v == "ok" for v in record["push"].values()) and len(record["push"]) == 2
    assert sum(d["requests"] for d in during) >= 2 and all(d["failed"] == 0 for d in during)
    # Requests were running during the swap: some finished with tokens of both versions.
    spans = [rec["weight_versions"] for url in urls for rec in pull(url)]
    assert any([v for _, v in span] == ["0", "1"] for span in spans)
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
    cursors = committed(state)["cursors"]
    feedback = 0.0
    for url in urls:
        text = httpx.get(f"{url}/metrics").text
        store = httpx.get(f"{url}/v1/trajectories", params={"after": 2 ** 62},
                          headers={"Authorization": f"Bearer {ADMIN}"}).json()["store_id"]
        assert metric(text, "e3rl_trajectories_acked_cursor", model="arith-chain") == \
            cursors[store]
        feedback += metric(text, "e3rl_feedback_total", model="arith-chain", result="stored")
    assert feedback == 12


def pull(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/trajectories", params={"limit": 10_000},
                     headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]


def committed(state: Path) -> dict:
    return json.loads((state / "state.json").read_text())


def test_sigkill_mid_batch_uses_every_trajectory_exactly_once(fleet):
    tmp, procs = fleet
    urls = [procs["a"][1], procs["b"][1]]
    servers = tmp / "servers.txt"
    servers.write_text("\n".join(urls) + "\n")
    assert traffic(urls, 60, seed=3, feedback_every=1)["failed"] == 0
    state = tmp / "state"
    env = {**os.environ, "E3RL_ADMIN_KEY": ADMIN, "OMP_NUM_THREADS": "1"}
    with open(tmp / "follow.log", "a") as out:
        proc = subprocess.Popen(follow_cmd(state, servers, "--max-updates", "3"), env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while not ((state / "ledger.jsonl").exists() and ledger(state)):
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp / "follow.log").read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # after update 1, while it pulls and fills batch 2
    proc.wait()
    assert committed(state)["update"] == 1
    done = run_follow(follow_cmd(state, servers, "--max-updates", "2"), tmp / "follow.log")
    assert done.returncode == 0, (tmp / "follow.log").read_text()[-3000:]
    entries = ledger(state)
    assert [e["step"] for e in entries] == [1, 2, 3]
    used = [i for e in entries for i in e["used"]]
    skipped = [i for e in entries for ids in e["skipped"].values() for i in ids]
    assert len(used) == 24 and len(set(used)) == len(used)  # each used once
    assert not set(used) & set(skipped) and len(set(skipped)) == len(skipped)
    # Nothing lost: every stored trajectory up to a committed cursor is in the ledger.
    cursors = committed(state)["cursors"]
    seen = set(used) | set(skipped)
    covered = []
    for url in urls:
        r = httpx.get(f"{url}/v1/trajectories", params={"limit": 10_000},
                      headers={"Authorization": f"Bearer {ADMIN}"}).json()
        covered += [rec["id"] for rec in r["data"] if rec["cursor"] <= cursors.get(r["store_id"], 0)]
    assert sorted(covered) == sorted(seen)
    assert len(cursors) == 2  # both replicas contributed


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")) or (
                not want and line.startswith(name + " ")):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{{want}}} not in the metrics")


def test_a_replica_down_during_a_push_is_retried_and_brought_up_to_date(fleet):
    tmp, procs = fleet
    urls = [procs["a"][1], procs["b"][1]]
    servers = tmp / "servers.txt"
    servers.write_text("\n".join(urls) + "\n")
    # Fewer usable trajectories than a batch: the trainer pulls them and waits for more.
    assert traffic(urls, 10, seed=5, feedback_every=1)["failed"] == 0
    state = tmp / "state"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "E3RL_ADMIN_KEY": ADMIN, "OMP_NUM_THREADS": "1"}
    with open(tmp / "follow.log", "a") as out:
        proc = subprocess.Popen(follow_cmd(state, servers, "--metrics-port", str(port),
                                           "--batch-size", "16"),
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    trainer = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{trainer}/health").status_code == 200, proc, tmp)
        # The trainer holds part of its batch; replica b goes down, a's traffic completes
        # the batch (one update: 20 trajectories for a batch of 16).
        wait_for(lambda: metric(httpx.get(f"{trainer}/metrics").text,
                                "e3rl_trainer_trajectories_pulled_total",
                                server=urls[1]) == 5, proc, tmp)
        procs["b"][0].kill()
        procs["b"][0].wait()
        assert traffic(urls[:1], 10, seed=6, feedback_every=1)["failed"] == 0
        wait_for(lambda: (state / "ledger.jsonl").exists() and ledger(state), proc, tmp)
        wait_for(lambda: metric(httpx.get(f"{trainer}/metrics").text,
                                "e3rl_trainer_push_failures_total", server=urls[1]) >= 1,
                 proc, tmp)
        text = httpx.get(f"{trainer}/metrics").text
        assert metric(text, "e3rl_trainer_replicas_behind") == 1
        assert metric(text, "e3rl_trainer_replica_version", server=urls[1]) == -1
        assert metric(text, "e3rl_trainer_replica_version", server=urls[0]) == 1
        assert versions(urls[0])[0] == "1"  # the other replica serves the new version
        # b returns on the same data dir (a new address, as a rescheduled pod would get).
        procs["b"] = serve(tmp, "b")
        servers.write_text(f"{urls[0]}\n{procs['b'][1]}\n")
        wait_for(lambda: metric(httpx.get(f"{trainer}/metrics").text,
                                "e3rl_trainer_replicas_behind") == 0, proc, tmp)
        assert versions(procs["b"][1])[0] == "1"
        assert greedy(procs["b"][1]) == greedy(urls[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def wait_for(condition, proc, tmp: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (httpx.HTTPError, AssertionError, ValueError):
            pass
        assert proc.poll() is None, (tmp / "follow.log").read_text()[-3000:]
        assert time.monotonic() < deadline, (tmp / "follow.log").read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.parametrize("flags,reason", [
    (["--lr", "0.5", "--gate-data", "arith-chain:validation", "--gate-problems", "40",
      "--max-kl", "0", "--min-entropy-ratio", "0"], "gate: pass@1"),
    (["--max-kl", "1e-9"], "kl: "),
], ids=["gate", "kl"])
def test_a_guard_refuses_an_update(quiet_fleet, flags, reason, tmp_path):
    _, procs = quiet_fleet
    tmp = tmp_path
    urls = [procs["a"][1], procs["b"][1]]
    servers = tmp / "servers.txt"
    servers.write_text("\n".join(urls) + "\n")
    before = [greedy(u) for u in urls]
    base = versions(urls[0])[0]
    assert traffic(urls, 24, seed=7, feedback_every=1)["failed"] == 0
    state = tmp / "state"
    done = run_follow(follow_cmd(state, servers, "--max-updates", "1", *flags),
                      tmp / "follow.log")
    log = (tmp / "follow.log").read_text()
    assert done.returncode == 0, log[-3000:]
    record = json.loads((state / "follow_log.jsonl").read_text().splitlines()[-1])
    assert record["outcome"] == "refused", record
    if reason.startswith("gate"):  # made harmful on purpose: far below the serving model
        assert record["gate_candidate"] < record["gate_serving"] - 0.02
    assert "update 1 refused, not pushed" in log and reason in log
    assert (state / "refused" / "step-000001" / "model.safetensors").is_file()
    assert committed(state)["version"] == base and "push" not in record
    for url, expected in zip(urls, before):
        assert versions(url)[0] == base and greedy(url) == expected


def test_dry_run_trains_without_pushing_or_acknowledging(quiet_fleet, tmp_path):
    _, procs = quiet_fleet
    tmp = tmp_path
    urls = [procs["a"][1], procs["b"][1]]
    servers = tmp / "servers.txt"
    servers.write_text("\n".join(urls) + "\n")
    base = versions(urls[0])[0]
    acked = [metric(httpx.get(f"{url}/metrics").text, "e3rl_trajectories_acked_cursor",
                    model="arith-chain") for url in urls]
    assert traffic(urls, 16, seed=9, feedback_every=1)["failed"] == 0
    state = tmp / "state"
    done = run_follow(follow_cmd(state, servers, "--max-updates", "1", "--dry-run"),
                      tmp / "follow.log")
    assert done.returncode == 0, (tmp / "follow.log").read_text()[-3000:]
    record = json.loads((state / "follow_log.jsonl").read_text().splitlines()[-1])
    assert record["outcome"] == "dry_run" and "push" not in record
    assert (state / "checkpoints" / "step-000001" / "model.safetensors").is_file()
    for url, before in zip(urls, acked):  # nothing acknowledged by the dry run
        assert versions(url)[0] == base
        assert metric(httpx.get(f"{url}/metrics").text, "e3rl_trajectories_acked_cursor",
                      model="arith-chain") == before
