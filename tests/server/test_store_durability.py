"""A real ``e3rl serve`` process under load: killed with SIGKILL and restarted on the same data
directory, its store passes ``PRAGMA integrity_check`` and holds the trajectory of every
request that had completed (as its client saw it) before the kill; stopped with SIGTERM under
load, it exits cleanly and again nothing a client saw complete is lost."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import threading
import time

import httpx

from e3rl.server.settings import STORE_FILE_NAME

from .conftest import start_serve_process

ADMIN = {"Authorization": "Bearer adm"}
NUM_WORKERS = 6


def start_server(model, data_dir, log_path) -> tuple[subprocess.Popen, str]:
    return start_serve_process(
        ["--model", str(model), "--data-dir", str(data_dir), "--admin-key", "adm",
         "--num-kv-blocks", "256", "--num-threads", "1", "--no-access-log",
         "--log-level", "info"], log_path=log_path)


async def _worker(client: httpx.AsyncClient, w: int, completed: list[str]) -> None:
    """Requests until the server goes away; a trajectory id joins ``completed`` when the
    client has seen its request complete (the response, or the stream's final chunk)."""
    i = 0
    try:
        while True:
            i += 1
            kind = (w + i) % 3
            body = {"max_tokens": 6 + i % 7, "temperature": 1.0, "seed": w * 1000 + i,
                    "ignore_eos": True}
            if kind == 0:
                r = await client.post("/v1/completions", json={**body, "prompt": f"w{w} {i}",
                                                               "n": 2})
                if r.status_code != 200:
                    return
                completed += [f"{r.json()['id']}-0:{c['index']}" for c in r.json()["choices"]]
            elif kind == 1:
                r = await client.post("/v1/chat/completions", json={
                    **body, "messages": [{"role": "user", "content": f"w{w} {i}"}]})
                if r.status_code != 200:
                    return
                completed.append(f"{r.json()['id']}-0:0")
            else:
                async with client.stream("POST", "/v1/completions", json={
                        **body, "prompt": f"s{w} {i}", "stream": True}) as r:
                    if r.status_code != 200:
                        return
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            event = json.loads(line[len("data: "):])
                            if event["choices"] and event["choices"][0]["finish_reason"]:
                                completed.append(f"{event['id']}-0:0")
    except httpx.TransportError:  # killed or shutting down
        return


class Load:
    """``NUM_WORKERS`` clients hammering ``url`` from a thread, until the server is gone."""

    def __init__(self, url: str):
        self.url = url
        self.completed: list[str] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()

    async def _main(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            await asyncio.gather(*(_worker(client, w, self.completed)
                                   for w in range(NUM_WORKERS)))

    def wait_for(self, num_completed: int) -> None:
        deadline = time.monotonic() + 60
        while len(self.completed) < num_completed:
            assert self.thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)

    def join(self) -> list[str]:
        self.thread.join(60)
        assert not self.thread.is_alive()
        return list(self.completed)


def integrity(path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def stored(path) -> dict[str, dict]:
    with sqlite3.connect(path) as conn:
        return {row[0]: json.loads(row[1]) for row in
                conn.execute("SELECT id, body FROM trajectories ORDER BY seq")}


def test_sigkill_then_sigterm_lose_nothing_a_client_saw_complete(tiny_model, tmp_path):
    data_dir, log = tmp_path / "data", tmp_path / "server.log"
    db = data_dir / STORE_FILE_NAME

    proc, url = start_server(tiny_model, data_dir, log)
    try:
        load = Load(url)
        load.wait_for(40)
        proc.send_signal(signal.SIGKILL)  # mid-load: requests are running and committing
        proc.wait(30)
        before_kill = load.join()
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL

    proc, url = start_server(tiny_model, data_dir, log)  # same data directory
    try:
        assert integrity(db) == "ok"
        with httpx.Client(base_url=url, timeout=30) as c:
            body = c.get("/v1/trajectories", params={"limit": 10_000}, headers=ADMIN).json()
        pulled = {r["id"]: r for r in body["data"]}
        missing = set(before_kill) - pulled.keys()
        assert not missing, f"{len(missing)} completed request(s) lost to SIGKILL"
        assert all(len(r["output_token_ids"]) == r["num_output_tokens"] > 0
                   for r in pulled.values())

        load = Load(url)
        load.wait_for(40)
        proc.send_signal(signal.SIGTERM)  # graceful: in-flight requests finish, queue drains
        assert proc.wait(60) == 0, log.read_text()
        after_term = load.join()
    finally:
        proc.kill()
    assert integrity(db) == "ok"
    rows = stored(db)
    missing = set(before_kill + after_term) - rows.keys()
    assert not missing, f"{len(missing)} completed request(s) lost"
    assert len(after_term) >= 40
    text = log.read_text()
    assert "Application shutdown complete" in text
    assert text.count("record(s) drained") == 1  # the SIGTERM'd server closed its store
