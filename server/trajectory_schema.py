"""The trajectory store's file format: SQLite schema, its migrations, and how a record
becomes a row.

A row is the record's JSON body plus columns derived from it for queries: ``seq`` (the
cursor: ``INTEGER PRIMARY KEY AUTOINCREMENT``, assigned in commit order by the single
writer, never reused even after retention deleted every row), ``id`` (unique: inserts are
idempotent), ``created_at`` (age retention), ``num_erasures`` and ``weight_version``
(filtered pulls). ``schema_version`` holds the file's version; ``migrate`` applies the
missing steps of ``MIGRATIONS`` at open.

Beside the log (version 3): ``meta`` holds the file's ``store_id``, a random UUID made once,
when the file gets version 3, so a consumer can tell that a cursor it kept belongs to another
file (the data directory was wiped or replaced); ``feedback`` holds at most one reward or
reference per trajectory (deleted with its trajectory); ``consumers`` holds each consumer's
acknowledged cursor, which bounds retention.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_BUSY_TIMEOUT_S = 10.0

# Ordered schema migrations: MIGRATIONS[v] takes a file from version v to v + 1. Append only;
# never edit a released step. Each runs in one transaction with the version bump.
MIGRATIONS: list[tuple[str, ...]] = [
    # 1: the append-only log: commit-ordered cursor, unique id, creation time for retention.
    ("CREATE TABLE trajectories (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
     " id TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, body TEXT NOT NULL)",
     "CREATE INDEX trajectories_created_at ON trajectories (created_at)"),
    # 2: query columns derived from the body (backfilled), for filtered pulls.
    ("ALTER TABLE trajectories ADD COLUMN num_erasures INTEGER NOT NULL DEFAULT 0",
     "ALTER TABLE trajectories ADD COLUMN weight_version TEXT",
     "UPDATE trajectories SET"
     " num_erasures = COALESCE(json_array_length(body, '$.erasures'), 0),"
     " weight_version = COALESCE(json_extract(body, '$.weight_version'),"
     "                           json_extract(body, '$.weight_versions[#-1][1]'))",
     "CREATE INDEX trajectories_with_erasures ON trajectories (seq) WHERE num_erasures > 0",
     "CREATE INDEX trajectories_weight_version ON trajectories (weight_version, seq)"),
    # 3: the follow loop: the file's identity, feedback per trajectory, consumers' cursors.
    ("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
     # A version-4 UUID as 32 hex digits (uuid.uuid4().hex's format), made in SQL so the
     # step stays a plain list of statements.
     "INSERT INTO meta (key, value) VALUES ('store_id', lower(hex(randomblob(6)) || '4' ||"
     " substr(hex(randomblob(2)), 2) || substr('89ab', 1 + abs(random() % 4), 1) ||"
     " substr(hex(randomblob(2)), 2) || hex(randomblob(6))))",
     "CREATE TABLE feedback (trajectory_id TEXT PRIMARY KEY, reward REAL, reference TEXT,"
     " received_at REAL NOT NULL)",
     "CREATE TRIGGER trajectories_delete_feedback AFTER DELETE ON trajectories"
     " BEGIN DELETE FROM feedback WHERE trajectory_id = OLD.id; END",
     "CREATE TABLE consumers (name TEXT PRIMARY KEY, cursor INTEGER NOT NULL,"
     " updated_at REAL NOT NULL)"),
]
SCHEMA_VERSION = len(MIGRATIONS)


class TrajectoryStoreError(Exception):
    """The store file cannot be opened or written (e.g. written by a newer e3rl, damaged, or
    on a full disk: ``is_disk_full``)."""

    def __init__(self, message: str, is_disk_full: bool = False):
        super().__init__(message)
        self.is_disk_full = is_disk_full


def is_disk_full(exc: sqlite3.Error) -> bool:
    """Whether SQLite failed for want of space (``SQLITE_FULL``: the disk, or the file system,
    returned ENOSPC; also a ``max_page_count`` reached)."""
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


def record_row(record: dict[str, Any]) -> tuple[str, float, int, str | None, str]:
    """The columns of one record (raises TypeError / ValueError if not serialisable)."""
    created_at = record.get("created_at")
    if created_at is None:
        record = {**record, "created_at": time.time()}
        created_at = record["created_at"]
    version = record.get("weight_version")
    if version is None and record.get("weight_versions"):
        version = record["weight_versions"][-1][1]
    body = _dumps(record)
    return (record["id"], float(created_at), len(record.get("erasures") or ()),
            None if version is None else str(version), body)


def with_feedback(body: str, reward: float | None, reference: str | None,
                  received_at: float | None) -> str:
    """A stored body with its ``feedback`` appended (the columns of a ``LEFT JOIN`` of the
    feedback table: all None when there is none), without parsing the body again. A body is
    always a non-empty JSON object (it has an ``id``), so replacing its closing brace is safe."""
    if received_at is None:
        return f'{body[:-1]},"feedback":null}}'
    feedback = json.dumps({"reward": reward, "reference": reference,
                           "received_at": received_at}, separators=(",", ":"))
    return f'{body[:-1]},"feedback":{feedback}}}'


def _dumps(record: dict[str, Any]) -> str:
    """Strict JSON (what HTTP clients can parse): a non-finite float becomes null."""
    try:
        return json.dumps(record, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(record), separators=(",", ":"), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; the writer says BEGIN/COMMIT itself.
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise TrajectoryStoreError(f"{path}: cannot use WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    except BaseException:  # e.g. "file is not a database": no connection left open
        conn.close()
        raise
    return conn


def open_file(path: Path, synchronous: str) -> tuple[sqlite3.Connection, int]:
    """The writer's connection to the store file ``path`` (created when missing), migrated to
    ``SCHEMA_VERSION``, and its schema version. A file SQLite cannot read (garbage, truncated,
    damaged schema or first or last rows) raises ``TrajectoryStoreError`` naming the file: it
    is never replaced by an empty store."""
    conn = None
    try:
        conn = connect(path, synchronous)
        version = migrate(conn, path)
        _probe(conn)
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        raise _refusal(path, exc) from None
    return conn, version


def check_file(path: Path) -> None:
    """Raise ``TrajectoryStoreError`` (one line naming the file) unless the store file at
    ``path``, if there is one, can be opened and read by this e3rl; writes nothing (no
    migration). ``e3rl serve`` calls it before loading the model, to fail fast."""
    if not path.exists():
        return
    conn = None
    try:
        # The default journal: opening must not write (the file is in WAL mode already).
        conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if "schema_version" in tables:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is not None and row[0] > SCHEMA_VERSION:
                raise _newer(path, row[0])
        if "trajectories" in tables:
            _probe(conn)
    except sqlite3.Error as exc:
        raise _refusal(path, exc) from None
    finally:
        if conn is not None:
            conn.close()


def _probe(conn: sqlite3.Connection) -> None:
    """Read the oldest and the newest row whole (``length`` reads a body's overflow pages),
    so that a damaged file is refused at start rather than at the first pull. Damage deeper
    in the file shows when a pull reaches it (``PRAGMA integrity_check`` checks it all)."""
    for order in ("ASC", "DESC"):
        conn.execute(f"SELECT seq, id, length(body) FROM trajectories ORDER BY seq {order}"
                     " LIMIT 1").fetchall()


def _refusal(path: Path, exc: sqlite3.Error) -> TrajectoryStoreError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return TrajectoryStoreError(
            f"{path}: the trajectory store is damaged ({exc}); it is not replaced: move it "
            "aside (or repair it with sqlite3's .recover) or use another --data-dir")
    return TrajectoryStoreError(f"{path}: cannot open the trajectory store: {exc}",
                                is_disk_full=is_disk_full(exc))


def _newer(path: Path, version: int) -> TrajectoryStoreError:
    return TrajectoryStoreError(f"{path}: schema version {version} is newer than this e3rl's "
                                f"({SCHEMA_VERSION}); upgrade e3rl or use another --data-dir")


def migrate(conn: sqlite3.Connection, path: Path) -> int:
    """Bring the file to ``SCHEMA_VERSION``, one migration per step, all in one transaction
    (a crash mid-way leaves the old version intact)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = 0 if row is None else row[0]
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        if version > SCHEMA_VERSION:
            raise _newer(path, version)
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
        if 0 < version < SCHEMA_VERSION:
            logger.info("trajectory store %s: migrated schema v%d -> v%d", path, version,
                        SCHEMA_VERSION)
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        conn.close()
        raise
    return SCHEMA_VERSION
