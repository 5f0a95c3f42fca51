"""Disk faults: a full disk while trajectories are written, and a damaged store file at start.

Full disk: SQLite reports ENOSPC as ``SQLITE_FULL`` ("database or disk is full"), the error a
``max_page_count`` reached also gives; the test fills the store that way (a size-limited file
system needs root). Requests still complete, the lost trajectories are counted in
``e3rl_trajectories_failed_total{reason="disk_full"}`` and logged once (not once per record),
feedback gets a 507, and storing resumes, logged, as soon as there is room again.

Damaged file: garbage where the store file is makes ``e3rl serve`` refuse to start with one
line naming the file (exit status 2, before the model loads), and the store and the app refuse
it too; the file is left as it was, never replaced by an empty store."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from e3rl.server.app import create_app
from e3rl.server.settings import STORE_FILE_NAME
from e3rl.server.trajectory_schema import check_file
from e3rl.server.trajectory_store import TrajectoryStore, TrajectoryStoreError

from tests.server.conftest import make_settings

ADMIN = {"Authorization": "Bearer adm"}
LONG = "word " * 60  # 300 prompt tokens: a record of ~3 KB


def failed_counts(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "e3rl_trajectories_failed_total"}


def set_max_pages(store: TrajectoryStore, num_pages: int | None) -> int:
    """Cap the file at its current size (None) or at ``num_pages``; returns the cap."""
    def job(conn: sqlite3.Connection) -> int:
        cap = num_pages or conn.execute("PRAGMA page_count").fetchone()[0]
        return conn.execute(f"PRAGMA max_page_count = {cap}").fetchone()[0]

    return store.run_in_writer(job).result(30)


def fill_disk(store: TrajectoryStore) -> None:
    """No room left: the file capped at its size, and the pages of the trajectory and the
    feedback tables filled with rows smaller than any a request writes, until one does not
    fit (so that no request's row can fit either)."""
    set_max_pages(store, None)

    def feedback_row(i: int):
        return lambda conn: conn.execute("INSERT INTO feedback (trajectory_id, reward,"
                                         " received_at) VALUES (?, 0, 0)", (f"f{i}",))

    for fill in (lambda i: store.submit({"id": f"f{i}"}), lambda i: store.run_in_writer(
            feedback_row(i))):
        for i in range(10_000):
            try:
                fill(i).result(30)
            except TrajectoryStoreError as exc:
                assert exc.is_disk_full
                break
        else:
            raise AssertionError("the store never filled up")


def test_a_full_disk_fails_no_request_counts_and_logs_the_loss_and_recovers(tiny_model, engine,
                                                                            caplog):
    caplog.set_level("INFO", logger="e3rl.server.trajectory_store")
    with TestClient(create_app(make_settings(tiny_model, admin_key="adm"),
                               engine=engine)) as client:
        store = client.app.state.store
        before = client.post("/v1/completions", json={"prompt": LONG, "max_tokens": 8})
        assert before.status_code == 200 and store.count() == 1
        assert failed_counts(client) == {"disk_full": 0, "error": 0}

        fill_disk(store)  # the disk is full from here on
        num_stored, num_failed = store.count(), failed_counts(client)["disk_full"]
        assert num_failed == 1
        outputs = [
            client.post("/v1/completions", json={"prompt": LONG, "max_tokens": 8,
                                                 "ignore_eos": True}),
            client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": LONG}], "max_tokens": 8,
                "ignore_eos": True}),
            client.post("/v1/completions", json={"prompt": LONG, "max_tokens": 8,
                                                 "ignore_eos": True, "stream": True})]
        for r in outputs:  # every request completes, whole
            assert r.status_code == 200, r.text
        assert outputs[0].json()["usage"]["completion_tokens"] == 8
        assert outputs[1].json()["usage"]["completion_tokens"] == 8
        assert outputs[2].text.rstrip().endswith("data: [DONE]")
        assert failed_counts(client) == {"disk_full": num_failed + 3, "error": 0}
        assert store.count() == num_stored
        # One line for the four records lost (the filler's and the requests'), not four.
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"
                  and "record(s) not stored" in r.getMessage()]
        assert len(errors) == 1, errors
        assert "disk full" in errors[0] and "database or disk is full" in errors[0]
        r = client.post("/v1/feedback", json={"id": before.json()["id"], "reward": 1.0})
        assert r.status_code == 507 and r.json()["error"]["code"] == "store_full"
        assert client.get("/ready").status_code == 200

        set_max_pages(store, 2 ** 30)  # room again
        after = client.post("/v1/completions", json={"prompt": LONG, "max_tokens": 8})
        assert after.status_code == 200
        assert store.get(f"{after.json()['id']}-0:0") is not None
        assert store.count() == num_stored + 1
        assert any("writing again" in r.getMessage() and r.levelname == "WARNING"
                   for r in caplog.records)
        r = client.post("/v1/feedback", json={"id": before.json()["id"], "reward": 1.0})
        assert r.status_code == 200
        assert store.integrity_check() == "ok"
        assert failed_counts(client) == {"disk_full": num_failed + 3, "error": 0}


# -- a damaged store file ------------------------------------------------------------------------
def _store_file(directory) -> bytes:
    """A store file with a few hundred records (several pages, overflow pages included)."""
    store = TrajectoryStore(directory / STORE_FILE_NAME)
    for i in range(200):
        store.submit({"id": f"r{i}", "body": os.urandom(600).hex()})
    store.close()
    assert not (directory / f"{STORE_FILE_NAME}-wal").exists()  # checkpointed at close
    return (directory / STORE_FILE_NAME).read_bytes()


DAMAGE = {
    "garbage": lambda good: os.urandom(len(good)),
    "header": lambda good: os.urandom(100) + good[100:],
    "first page": lambda good: good[:100] + os.urandom(3900) + good[4000:],
    "last pages": lambda good: good[:-8192] + os.urandom(8192),
    "truncated": lambda good: good[: len(good) // 2],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_store_is_refused_naming_the_file(damage, tiny_model, engine, tmp_path):
    """The store, its start-up check and the app each refuse the file, naming it, and leave
    it as it is."""
    path = tmp_path / STORE_FILE_NAME
    bad = DAMAGE[damage](_store_file(tmp_path))
    path.write_bytes(bad)
    for attempt in (lambda: check_file(path), lambda: TrajectoryStore(path)):
        with pytest.raises(TrajectoryStoreError) as info:
            attempt()
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)
    with pytest.raises(TrajectoryStoreError, match="trajectory store"):
        with TestClient(create_app(make_settings(tiny_model, data_dir=str(tmp_path)),
                                   engine=engine)):
            pass
    assert path.read_bytes() == bad


def test_serve_refuses_a_garbage_store_in_one_line(tiny_model, tmp_path):
    path = tmp_path / STORE_FILE_NAME
    bad = DAMAGE["garbage"](_store_file(tmp_path))
    path.write_bytes(bad)
    result = subprocess.run(
        [sys.executable, "-m", "e3rl.server.cli", "serve", "--model", str(tiny_model),
         "--data-dir", str(tmp_path), "--port", "0"], capture_output=True, text=True,
        timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr == (f"e3rl: error: {path}: the trajectory store is damaged (file is "
                             "not a database); it is not replaced: move it aside (or repair "
                             "it with sqlite3's .recover) or use another --data-dir\n")
    assert path.read_bytes() == bad and sorted(os.listdir(tmp_path)) == [STORE_FILE_NAME]
