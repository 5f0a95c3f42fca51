"""The trajectory store: group commit, cursors, idempotence, modes, retention, the queue
bound, schema migration, feedback, settled reads, consumers' acks and the retention they
bound, and durability (SIGKILL mid-write, graceful close)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest

from e3rl.server.trajectory import trajectory_records
from e3rl.server.trajectory_schema import MIGRATIONS, record_row
from e3rl.server.trajectory_store import (SCHEMA_VERSION, TrajectoryStore,
                                          TrajectoryStoreError)


def make_record(i: int, num_erasures: int = 0, created_at: float | None = None,
                version: str = "0") -> dict:
    erasures = [{"position": 3, "erased_token_ids": [5, 6], "erased_nll": [2.5, 3.0],
                 "erased_entropy": [1.0, 1.25], "score": 2.75, "threshold": 2.0,
                 "attempt": 1, "replacement_token_ids": [7], "replacement_nll": [0.5],
                 "replacement_entropy": [0.75], "replacement_score": 0.5}] * num_erasures
    return {"id": f"req-{i}:0", "request_id": f"req-{i}", "index": 0,
            "created_at": time.time() if created_at is None else created_at,
            "model": "tiny", "weight_version": version, "weight_versions": [[0, version]],
            "prompt_token_ids": [1, 2, 3], "output_token_ids": [4, 5, 6, 7],
            "logprobs": [-0.1, -0.2, -0.3, -0.4], "nll": [0.1, 0.2, 0.3, 0.4],
            "entropy": [1.0, 0.9, 0.8, 0.7], "erasures": erasures, "text": f"text {i}"}


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "data" / "trajectories.db"


@pytest.fixture
def store(store_path):
    s = TrajectoryStore(store_path)
    yield s
    s.close()


def submit_all(store: TrajectoryStore, records: list[dict], timeout_s: float = 10.0) -> list:
    futures = [store.submit(r) for r in records]
    return [f.result(timeout_s) for f in futures]


def fetch_everything(store: TrajectoryStore, limit: int, after: int = 0) -> list[dict]:
    records = []
    while True:
        page, cursor = store.fetch(after, limit)
        assert len(page) <= limit
        if not page:
            assert cursor == after
            return records
        assert cursor == page[-1]["cursor"]
        records += page
        after = cursor


def strip_read_fields(record: dict) -> dict:
    """The record as submitted: without ``cursor`` and ``feedback``, added at read time."""
    return {k: v for k, v in record.items() if k not in ("cursor", "feedback")}


# -- group commit, cursors, idempotence ------------------------------------------------------

def test_group_commit_many_records_few_transactions(store_path):
    store = TrajectoryStore(store_path, batch_max=256, batch_wait_s=0.05)
    try:
        records = [make_record(i) for i in range(1000)]
        assert submit_all(store, records) == [True] * 1000
        assert store.count() == 1000 and store.num_written == 1000
        assert store.num_transactions <= 20, store.num_transactions
        assert store.integrity_check() == "ok"
    finally:
        store.close()


def test_paging_covers_everything_once_in_commit_order(store):
    records = [make_record(i, num_erasures=i % 3) for i in range(57)]
    submit_all(store, records)
    for limit in (1, 7, 57, 100):
        got = fetch_everything(store, limit)
        assert [strip_read_fields(r) for r in got] == records
        cursors = [r["cursor"] for r in got]
        assert cursors == sorted(set(cursors))
    # Re-reading a range returns the same records.
    page, cursor = store.fetch(10, 5)
    assert store.fetch(10, 5) == (page, cursor)
    assert [r["id"] for r in page] == [r["id"] for r in records[10:15]]
    # Filtered pulls use the indexed columns.
    with_erasures, _ = store.fetch(0, 100, erasures_only=True)
    assert [r["id"] for r in with_erasures] == [r["id"] for r in records if r["erasures"]]
    assert store.fetch(0, 100, weight_version="1") == ([], 0)


def test_fetch_rejects_bad_arguments(store):
    for bad in (dict(after=-1), dict(limit=0), dict(limit=10**6), dict(after="3")):
        with pytest.raises(ValueError):
            store.fetch(**bad)
    with pytest.raises(ValueError):
        store.submit({"no": "id"})


def test_insert_is_idempotent_by_id(store):
    first = make_record(1)
    assert submit_all(store, [first, make_record(2)]) == [True, True]
    again = {**first, "text": "a different body"}
    assert submit_all(store, [again, again]) == [True, True]
    got = fetch_everything(store, 10)
    assert [r["id"] for r in got] == ["req-1:0", "req-2:0"]
    assert got[0]["text"] == "text 1"
    assert store.get("req-1:0") == got[0]
    assert store.get("missing") is None


def test_cursors_are_stable_across_restarts(store_path):
    store = TrajectoryStore(store_path)
    submit_all(store, [make_record(i) for i in range(10)])
    before = store.fetch(3, 4)
    store.close()
    store = TrajectoryStore(store_path, retention_age_s=3600)
    try:
        assert store.fetch(3, 4) == before
        submit_all(store, [make_record(i) for i in range(10, 20)])
        got = fetch_everything(store, 6)
        assert [r["id"] for r in got] == [f"req-{i}:0" for i in range(20)]
        last_cursor = got[-1]["cursor"]
        # Even when retention deleted every row, a cursor is never reused.
        submit_all(store, [make_record(i, created_at=time.time() - 7200)
                           for i in range(20, 25)])
        store.enforce_retention().result(10)
        assert store.count() == 20
        store.close()
        store = TrajectoryStore(store_path)
        submit_all(store, [make_record(99)])
        page, _ = store.fetch(last_cursor, 10)
        assert [r["id"] for r in page] == ["req-99:0"]
        assert page[0]["cursor"] > last_cursor + 5
    finally:
        store.close()


def test_submit_async(store):
    async def main():
        return await asyncio.gather(*(store.submit_async(make_record(i)) for i in range(20)))

    assert asyncio.run(main()) == [True] * 20
    assert store.count() == 20


def test_cancelled_waiters_do_not_cancel_the_write(store_path):
    """A client that goes away while its trajectory waits (the awaiting task is cancelled):
    the record is still written and the writer lives on."""
    store = TrajectoryStore(store_path, batch_max=1, batch_wait_s=0)
    blocker = sqlite3.connect(store_path, isolation_level=None)

    async def main():
        blocker.execute("BEGIN IMMEDIATE")  # the writer holds record 0, record 1 waits
        tasks = [asyncio.create_task(store.submit_async(make_record(i))) for i in range(2)]
        await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        blocker.execute("ROLLBACK")
        return await store.submit_async(make_record(2))

    try:
        assert asyncio.run(main()) is True
        assert store.count() == 3 and store.num_failed == 0
    finally:
        blocker.close()
        store.close()


def test_non_finite_floats_become_null_and_bad_records_fail_alone(store):
    record = make_record(1)
    record["entropy"] = [float("nan"), 1.0, float("inf"), 0.5]
    bad = {**make_record(2), "body": object()}
    good, failed, other = store.submit(record), store.submit(bad), store.submit(make_record(3))
    assert good.result(10) is True and other.result(10) is True
    with pytest.raises(TypeError):
        failed.result(10)
    assert store.num_failed == 1
    assert store.get("req-1:0")["entropy"] == [None, 1.0, None, 0.5]
    assert store.count() == 2


def test_a_failed_transaction_fails_its_futures_and_the_writer_goes_on(store_path):
    TrajectoryStore(store_path).close()
    conn = sqlite3.connect(store_path)
    conn.execute("CREATE TRIGGER poison BEFORE INSERT ON trajectories WHEN NEW.id = 'req-1:0'"
                 " BEGIN SELECT RAISE(ABORT, 'poisoned'); END")
    conn.close()
    store = TrajectoryStore(store_path)
    try:
        with pytest.raises(TrajectoryStoreError, match="poisoned"):
            store.submit(make_record(1)).result(10)
        assert store.num_failed == 1
        assert submit_all(store, [make_record(2)]) == [True]
        assert [r["id"] for r in fetch_everything(store, 10)] == ["req-2:0"]
    finally:
        store.close()


# -- modes, retention, queue bound -------------------------------------------------------------

def test_mode_erasures_stores_only_records_with_erasures(store_path):
    store = TrajectoryStore(store_path, mode="erasures")
    try:
        assert submit_all(store, [make_record(1), make_record(2, num_erasures=2)]) == [None, True]
        assert [r["id"] for r in fetch_everything(store, 10)] == ["req-2:0"]
    finally:
        store.close()


def test_mode_none_stores_nothing_but_serves_old_rows(store_path):
    store = TrajectoryStore(store_path)
    submit_all(store, [make_record(1)])
    store.close()
    store = TrajectoryStore(store_path, mode="none")
    try:
        future = store.submit(make_record(2, num_erasures=1))
        assert future.done() and future.result() is None
        assert [r["id"] for r in fetch_everything(store, 10)] == ["req-1:0"]
    finally:
        store.close()


def test_bad_settings_are_refused(store_path):
    for bad in (dict(mode="some"), dict(max_queue=0), dict(retention_rows=0),
                dict(retention_age_s=0), dict(synchronous="OFF"), dict(batch_max=0)):
        with pytest.raises(ValueError):
            TrajectoryStore(store_path, **bad)


def test_retention_by_rows_keeps_the_newest(store_path):
    store = TrajectoryStore(store_path, retention_rows=10)
    try:
        submit_all(store, [make_record(i) for i in range(25)])
        assert store.enforce_retention().result(10) == 15
        got = fetch_everything(store, 100)
        assert [r["id"] for r in got] == [f"req-{i}:0" for i in range(15, 25)]
        assert store.enforce_retention().result(10) == 0
    finally:
        store.close()


def test_retention_by_age_runs_periodically(store_path):
    store = TrajectoryStore(store_path, retention_age_s=600, retention_interval_s=0.05)
    try:
        now = time.time()
        old = [make_record(i, created_at=now - 3600) for i in range(5)]
        new = [make_record(i, created_at=now) for i in range(5, 8)]
        submit_all(store, old + new)
        deadline = time.monotonic() + 10
        while store.count() > 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [r["id"] for r in fetch_everything(store, 100)] == [r["id"] for r in new]
        assert store.num_retained_deleted == 5
    finally:
        store.close()


def test_full_queue_drops_counted_without_blocking(store_path, caplog):
    """A stalled writer (another connection holds the write lock, as a slow disk would):
    past ``max_queue`` records are dropped at once, counted, warned about once, and the
    accepted ones are written when the writer can go on."""
    store = TrajectoryStore(store_path, max_queue=10, batch_max=1, batch_wait_s=0)
    blocker = sqlite3.connect(store_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        caplog.set_level(logging.WARNING, logger="e3rl.server.trajectory_store")
        futures = []
        for i in range(50):
            t0 = time.perf_counter()
            futures.append(store.submit(make_record(i)))
            assert time.perf_counter() - t0 < 1.0  # never waits for the stalled writer
        dropped = [f for f in futures if f.done()]
        accepted = [f for f in futures if not f.done()]
        assert all(f.result() is False for f in dropped)
        assert 10 <= len(accepted) <= 11 and store.num_dropped == len(dropped)
        warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert len(warnings) == 1  # rate-limited
        blocker.execute("ROLLBACK")
        assert [f.result(15) for f in accepted] == [True] * len(accepted)
        assert store.count() == len(accepted)
    finally:
        blocker.close()
        store.close()
    assert store.submit(make_record(99)).result() is False  # closed: dropped, counted
    assert store.num_dropped == 50 - len(accepted) + 1


# -- schema migration -----------------------------------------------------------------------

def test_opening_a_version_1_file_migrates_it(store_path):
    """A file as the first schema wrote it: no query columns. Opening it adds and backfills
    them, keeps every row and cursor, and later inserts continue the sequence."""
    store_path.parent.mkdir(parents=True)
    old = sqlite3.connect(store_path)
    old.executescript("""
        PRAGMA journal_mode = WAL;
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1);
        CREATE TABLE trajectories (seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, body TEXT NOT NULL);
        CREATE INDEX trajectories_created_at ON trajectories (created_at);
    """)
    records = [make_record(i, num_erasures=i % 2, version=f"v{i}") for i in range(4)]
    del records[3]["weight_version"]  # older records: only the per-token version list
    with old:
        old.executemany("INSERT INTO trajectories (id, created_at, body) VALUES (?, ?, ?)",
                        [(r["id"], r["created_at"], json.dumps(r)) for r in records])
    old.close()

    store = TrajectoryStore(store_path)
    try:
        assert store.schema_version == SCHEMA_VERSION == 3
        assert [strip_read_fields(r) for r in fetch_everything(store, 3)] == records
        page, _ = store.fetch(0, 10, erasures_only=True)
        assert [r["id"] for r in page] == ["req-1:0", "req-3:0"]
        assert [r["id"] for r in store.fetch(0, 10, weight_version="v3")[0]] == ["req-3:0"]
        submit_all(store, [make_record(10)])
        assert store.get("req-10:0")["cursor"] == store.last_cursor() == 5
        assert store.integrity_check() == "ok"
    finally:
        store.close()
    check = sqlite3.connect(store_path)
    assert check.execute("SELECT version FROM schema_version").fetchall() == [(3,)]
    check.close()


def test_a_newer_schema_is_refused(store_path):
    TrajectoryStore(store_path).close()
    conn = sqlite3.connect(store_path)
    with conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(TrajectoryStoreError, match="newer"):
        TrajectoryStore(store_path)


def make_v2_file(store_path, records: list[dict]) -> None:
    """A file exactly as schema version 2 left it, holding ``records``."""
    store_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(store_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (2)")
    for statement in MIGRATIONS[0] + MIGRATIONS[1]:
        conn.execute(statement)
    conn.executemany("INSERT INTO trajectories (id, created_at, num_erasures, weight_version,"
                     " body) VALUES (?, ?, ?, ?, ?)", [record_row(r) for r in records])
    conn.close()


def test_opening_a_version_2_file_migrates_it_and_gives_it_a_stable_store_id(store_path,
                                                                              tmp_path):
    records = [make_record(i) for i in range(3)]
    make_v2_file(store_path, records)
    store = TrajectoryStore(store_path)
    try:
        assert store.schema_version == 3
        assert [strip_read_fields(r) for r in fetch_everything(store, 10)] == records
        assert all(r["feedback"] is None for r in fetch_everything(store, 10))
        store_id = store.store_id
        assert uuid.UUID(store_id).version == 4 and uuid.UUID(store_id).hex == store_id
        assert store.consumers() == {} and store.acked_cursor is None
        assert store.add_feedback("req-1:0", reward=0.5).result(10) is True
    finally:
        store.close()
    store = TrajectoryStore(store_path)  # reopened: same id, feedback kept
    try:
        assert store.store_id == store_id
        assert store.get("req-1:0")["feedback"]["reward"] == 0.5
    finally:
        store.close()
    other = TrajectoryStore(tmp_path / "other.db")
    try:
        assert other.store_id != store_id
    finally:
        other.close()


# -- feedback, settled reads, consumers -----------------------------------------------------

def test_feedback_is_joined_at_read_time_and_a_later_one_replaces_it(store):
    submit_all(store, [make_record(i) for i in range(3)])
    assert store.add_feedback("req-1:0", reward=1.0).result(10) is True
    assert store.add_feedback("req-9:0", reward=1.0).result(10) is False  # not stored
    page, _ = store.fetch(0, 10)
    assert [r["feedback"] for r in page][::2] == [None, None]
    first = page[1]["feedback"]
    assert first["reward"] == 1.0 and first["reference"] is None
    assert abs(first["received_at"] - time.time()) < 60
    assert store.add_feedback("req-1:0", reference="42").result(10) is True
    feedback = store.get("req-1:0")["feedback"]
    assert feedback["reward"] is None and feedback["reference"] == "42"
    # The raw text (served without parsing) says the same, and is strict JSON.
    rows, _ = store.fetch_raw(0, 10)
    assert [json.loads(text) for _, text in rows] == [strip_cursor_only(r) for r in
                                                      store.fetch(0, 10)[0]]
    for bad in (dict(), dict(reward=1.0, reference="x"), dict(reward=float("nan")),
                dict(reward=True), dict(reward="1"), dict(reference=3)):
        with pytest.raises(ValueError):
            store.add_feedback("req-1:0", **bad)


def strip_cursor_only(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "cursor"}


def test_resolve_choice_maps_prompt_and_sample_by_n(store):
    records = []
    for completion, num_prompts, n in (("cmpl-a", 2, 2), ("cmpl-ab", 1, 1),
                                       ("chatcmpl-c", 1, 3)):
        for i in range(num_prompts):
            for j in range(n):
                records.append({**make_record(0), "id": f"{completion}-{i}:{j}",
                                "request_id": f"{completion}-{i}", "index": j, "n": n})
    submit_all(store, records)
    assert [store.resolve_choice("cmpl-a", c) for c in range(5)] == [
        "cmpl-a-0:0", "cmpl-a-0:1", "cmpl-a-1:0", "cmpl-a-1:1", None]
    assert store.resolve_choice("cmpl-ab", 0) == "cmpl-ab-0:0"
    assert store.resolve_choice("cmpl-ab", 1) is None
    assert store.resolve_choice("chatcmpl-c", 2) == "chatcmpl-c-0:2"
    for unknown in ("cmpl", "cmpl-a-0", "nope", ""):
        assert store.resolve_choice(unknown, 0) is None
    # The candidates come from a range on the unique index of ``id``, not a scan.
    conn = sqlite3.connect(store.path)
    plan = " ".join(row[-1] for row in conn.execute(
        "EXPLAIN QUERY PLAN SELECT json_extract(body, '$.n') FROM trajectories"
        " WHERE id >= ? AND id < ? LIMIT 1", ("cmpl-a-", "cmpl-a.")))
    conn.close()
    assert "USING INDEX" in plan and "(id>? AND id<?)" in plan, plan


def test_settled_reads_stop_at_the_first_young_row(store):
    now = time.time()
    ages = [100, 100, 1, 100, 100]  # the third row is young: the page stops before it
    submit_all(store, [make_record(i, created_at=now - age) for i, age in enumerate(ages)])
    page, cursor = store.fetch(0, 10, settled_s=50)
    assert [r["id"] for r in page] == ["req-0:0", "req-1:0"] and cursor == 2
    assert store.fetch(cursor, 10, settled_s=50) == ([], cursor)  # waits; skips nothing
    assert store.fetch_raw(cursor, 10, settled_s=50) == ([], cursor)
    page, cursor = store.fetch(cursor, 10, settled_s=0.5)
    assert [r["id"] for r in page] == ["req-2:0", "req-3:0", "req-4:0"] and cursor == 5
    assert len(store.fetch(0, 10, settled_s=0)[0]) == 5
    assert len(store.fetch(0, 10, settled_s=None)[0]) == 5
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            store.fetch(0, 10, settled_s=bad)


def test_ack_is_monotonic_and_bounded_by_the_newest_cursor(store):
    submit_all(store, [make_record(i) for i in range(5)])
    assert store.ack("trainer", 3).result(10) == 3
    assert store.ack("trainer", 1).result(10) == 3  # never moves back
    assert store.ack("eval", 5).result(10) == 5
    with pytest.raises(ValueError, match="beyond the newest"):
        store.ack("trainer", 6).result(10)
    assert store.consumers() == {"eval": 5, "trainer": 3} and store.acked_cursor == 3
    for consumer, cursor in (("", 1), ("x" * 129, 1), (3, 1), ("a\x00", 1), ("\ud800", 1),
                             ("t", -1), ("t", True),
                             ("t", 1.0)):
        with pytest.raises(ValueError):
            store.ack(consumer, cursor)


def test_writer_jobs_share_a_transaction_and_a_failing_one_undoes_only_itself(store_path):
    store = TrajectoryStore(store_path)
    blocker = sqlite3.connect(store_path, isolation_level=None)
    try:
        submit_all(store, [make_record(1)])
        blocker.execute("BEGIN IMMEDIATE")  # the jobs queue up behind the held lock

        def failing(conn):
            conn.execute("INSERT INTO consumers VALUES ('undone', 1, 0)")
            raise RuntimeError("job failed")

        transactions = store.num_transactions
        futures = [store.add_feedback("req-1:0", reward=2.0), store.run_in_writer(failing),
                   store.ack("kept", 1)]
        time.sleep(0.1)
        blocker.execute("ROLLBACK")
        assert futures[0].result(10) is True and futures[2].result(10) == 1
        with pytest.raises(RuntimeError, match="job failed"):
            futures[1].result(10)
        assert store.consumers() == {"kept": 1}
        assert store.get("req-1:0")["feedback"]["reward"] == 2.0
        assert store.num_transactions == transactions  # jobs are not records
    finally:
        blocker.close()
        store.close()
    with pytest.raises(TrajectoryStoreError, match="closed"):
        store.ack("late", 1).result(1)


def test_retention_with_a_consumer_deletes_only_acknowledged_rows(store_path):
    store = TrajectoryStore(store_path, retention_rows=2, retention_age_s=600)
    try:
        now = time.time()
        submit_all(store, [make_record(i, created_at=now - 3600) for i in range(10)])
        assert store.add_feedback("req-0:0", reward=1.0).result(10) is True
        assert store.add_feedback("req-9:0", reward=1.0).result(10) is True
        store.ack("trainer", 4).result(10)
        # Every row is too old and past the 2 newest, but only rows 1-4 were acknowledged.
        assert store.enforce_retention().result(10) == 4
        assert [r["cursor"] for r in fetch_everything(store, 100)] == list(range(5, 11))
        store.ack("trainer", 10).result(10)
        assert store.enforce_retention().result(10) == 6
        assert store.count() == 0 and store.last_cursor() == 10
        assert store.num_retained_deleted == 10 and store.num_evicted_unacked == 0
        assert store.ack("trainer", 10).result(10) == 10  # the newest cursor outlives its row
        # A deleted trajectory takes its feedback with it.
        conn = sqlite3.connect(store_path)
        assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 0
        conn.close()
    finally:
        store.close()


def test_hard_row_cap_evicts_unacknowledged_rows_counted_and_warned(store_path, caplog):
    store = TrajectoryStore(store_path, max_rows=3)
    caplog.set_level(logging.WARNING, logger="e3rl.server.trajectory_store")
    try:
        submit_all(store, [make_record(i) for i in range(10)])
        store.ack("trainer", 2).result(10)
        assert store.enforce_retention().result(10) == 7
        assert [r["cursor"] for r in fetch_everything(store, 100)] == [8, 9, 10]
        assert store.num_retained_deleted == 2 and store.num_evicted_unacked == 5
        [warning] = [r for r in caplog.records if "evicted" in r.getMessage()]
        assert "evicted 5 " in warning.getMessage()
        assert store.enforce_retention().result(10) == 0
    finally:
        store.close()
    # Without a consumer nothing is acknowledged: every row over the cap counts as evicted.
    store = TrajectoryStore(store_path.parent / "nobody.db", max_rows=4)
    try:
        submit_all(store, [make_record(i) for i in range(6)])
        assert store.enforce_retention().result(10) == 2
        assert store.num_evicted_unacked == 2 and store.count() == 4
    finally:
        store.close()


def test_mode_none_takes_feedback_and_acks_on_an_existing_file(store_path):
    store = TrajectoryStore(store_path)
    submit_all(store, [make_record(1)])
    store.close()
    store = TrajectoryStore(store_path, mode="none", max_rows=1, retention_rows=1)
    try:
        assert store.add_feedback("req-1:0", reward=0.0).result(10) is True
        assert store.ack("trainer", 1).result(10) == 1
        assert store.enforce_retention().result(10) == 0  # mode none never deletes
    finally:
        store.close()


# -- durability -----------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import collections, signal, sys, time
    from e3rl.server.trajectory_store import TrajectoryStore

    store = TrajectoryStore(sys.argv[1], batch_wait_s=0.001)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    inflight = collections.deque()
    i = 0
    try:
        while not stop:
            record = {"id": f"r{i}", "created_at": time.time(), "erasures": [],
                      "output_token_ids": list(range(i % 300)), "text": "x" * (i % 2000)}
            inflight.append((record["id"], store.submit(record)))
            i += 1
            # A window of in-flight records, so that several share a transaction.
            while inflight and (len(inflight) > 32 or inflight[0][1].done()):
                record_id, future = inflight.popleft()
                if future.result() is True:  # committed: acknowledged to the parent
                    print(record_id, flush=True)
    finally:
        store.close(drain=True)  # what SIGTERM does in the server
        print("submitted", i, "dropped", store.num_dropped, flush=True)
""")


def start_child(store_path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(store_path)],
                            stdout=subprocess.PIPE, text=True, env=env)


def read_acks(child: subprocess.Popen, num: int) -> list[str]:
    acked = []
    while len(acked) < num:
        line = child.stdout.readline()
        assert line, "the child died early"
        acked.append(line.strip())
    return acked


def test_sigkill_mid_write_loses_no_acknowledged_record(store_path):
    child = start_child(store_path)
    try:
        acked = read_acks(child, 2000)
        child.send_signal(signal.SIGKILL)
        acked += [line.strip() for line in child.stdout]  # acknowledged before it died
    finally:
        child.kill()
        child.wait(10)
    assert child.returncode == -signal.SIGKILL
    assert not any(a.startswith("submitted") for a in acked)  # killed mid-run
    store = TrajectoryStore(store_path)
    try:
        assert store.integrity_check() == "ok"
        stored = {r["id"] for r in fetch_everything(store, 1000)}
        assert set(acked) <= stored
        # Commit order: the stored ids are a prefix of the submission order.
        assert stored == {f"r{i}" for i in range(len(stored))}
    finally:
        store.close()


def test_sigterm_drains_every_accepted_record(store_path):
    child = start_child(store_path)
    try:
        read_acks(child, 500)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 0
    _, num_submitted, _, num_dropped = out.strip().splitlines()[-1].split()
    assert int(num_dropped) == 0
    check = sqlite3.connect(store_path)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert check.execute("SELECT COUNT(*) FROM trajectories").fetchone()[0] == int(num_submitted)
    check.close()


def test_close_drains_the_queue(store_path):
    store = TrajectoryStore(store_path, batch_max=16)
    futures = [store.submit(make_record(i)) for i in range(2000)]
    store.close(drain=True)
    assert all(f.result(0) is True for f in futures)
    store = TrajectoryStore(store_path)
    try:
        assert store.count() == 2000 and store.integrity_check() == "ok"
    finally:
        store.close()


def test_close_without_drain_drops_counted(store_path):
    store = TrajectoryStore(store_path, batch_max=1, batch_wait_s=0)
    blocker = sqlite3.connect(store_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # hold the writer so the queue stays full
    futures = [store.submit(make_record(i)) for i in range(20)]
    closer = threading.Thread(target=store.close, kwargs={"drain": False})
    closer.start()
    time.sleep(0.1)
    blocker.execute("ROLLBACK")
    blocker.close()
    closer.join(15)
    results = [f.result(0) for f in futures]
    assert results.count(False) == store.num_dropped >= 18
    reopened = TrajectoryStore(store_path)
    assert reopened.count() == results.count(True)
    reopened.close()


# -- records from the engine ----------------------------------------------------------------

def test_records_from_a_healing_engine_round_trip(tmp_path, store_path):
    from e3rl.engine import LLM, SamplingParams
    from e3rl.engine.healer import HealingParams
    from e3rl.engine.model_factory import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "model", "qwen3", seed=1)
    llm = LLM(model_dir, num_kv_blocks=64, block_size=4, num_threads=1)
    healing = HealingParams(threshold=-1.0, segment_boundary=["a", "e", "i", "o", " "],
                            min_segment_tokens=2, max_segment_tokens=8, max_erasures=50,
                            max_retries_per_segment=3, max_erased_fraction=1.0)
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=24, ignore_eos=True,
                            healing=healing)
    [out] = llm.generate(["hello"], params)
    records = trajectory_records(out, params, "tiny")
    assert [r["id"] for r in records] == [f"{out.request_id}:0", f"{out.request_id}:1"]
    for record, sample in zip(records, out.outputs):
        assert record["output_token_ids"] == sample.token_ids
        assert len(record["logprobs"]) == len(record["nll"]) == len(record["entropy"]) == 24
        assert record["num_erasures"] == len(sample.erasures) >= 1
        assert record["weight_versions"] == [[0, "0"]] and record["weight_version"] == "0"
        assert record["healing_params"]["threshold"] == -1.0
        assert record["sampling_params"]["seed"] == 3 and "healing" not in record["sampling_params"]
        assert record["segments"][0]["start"] == 0
        assert {"e2e_latency_s", "time_to_first_token_s"} <= set(record["timings"])
        e = record["erasures"][0]
        assert len(e["erased_token_ids"]) == len(e["erased_nll"]) == len(e["erased_entropy"])
        assert e["score"] > e["threshold"] and e["replacement_token_ids"]
    store = TrajectoryStore(store_path)
    try:
        assert submit_all(store, records) == [True, True]
        assert [strip_read_fields(r) for r in fetch_everything(store, 1)] == records
    finally:
        store.close()
    with pytest.raises(ValueError):
        trajectory_records(type(out)("x", None, [1], [], finished=False), params, "tiny")
