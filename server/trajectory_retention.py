"""Retention of the trajectory store: which rows a pass deletes, given the consumers' cursors.

The policy (``--store-retention-rows``, ``--store-retention-age-s``) is a wish to free space,
never a reason to lose data a trainer has not read: once any consumer has acknowledged a
cursor (``POST /v1/trajectories/ack``), it deletes only rows with ``seq <=`` the smallest
acknowledged cursor. With no consumer registered it deletes what the policy says (the
behaviour before consumers existed). The hard cap (``--store-max-rows``) bounds the file
whatever the consumers say: it deletes the oldest rows beyond the cap, acknowledged or not,
and the unacknowledged ones (all of them when no consumer is registered) are counted as
evicted, so a stalled trainer shows up in the metrics and the log instead of filling the
disk. A trajectory's feedback row goes with it (a trigger of the schema).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass


@dataclass(slots=True)
class RetentionResult:
    """What one pass deleted."""

    num_deleted: int = 0  # by the policy, or by the cap but already acknowledged
    num_evicted_unacked: int = 0  # by the cap, past the smallest acknowledged cursor

    @property
    def num_total(self) -> int:
        return self.num_deleted + self.num_evicted_unacked


def acked_cursor(conn: sqlite3.Connection) -> int | None:
    """The smallest cursor any consumer acknowledged (None: no consumer registered)."""
    return conn.execute("SELECT MIN(cursor) FROM consumers").fetchone()[0]


def retain(conn: sqlite3.Connection, *, max_newest: int | None, max_age_s: float | None,
           max_rows: int | None, now: float) -> RetentionResult:
    """Delete, in the caller's transaction: rows older than the ``max_newest`` newest and
    rows created before ``now - max_age_s`` (both only up to the acknowledged cursor when a
    consumer exists), then the oldest rows beyond ``max_rows`` whatever was acknowledged."""
    floor = acked_cursor(conn)
    guard, guard_args = ("", ()) if floor is None else (" AND seq <= ?", (floor,))
    result = RetentionResult()
    if max_newest is not None:
        result.num_deleted += conn.execute(
            "DELETE FROM trajectories WHERE seq <= (SELECT seq FROM trajectories"
            " ORDER BY seq DESC LIMIT 1 OFFSET ?)" + guard, (max_newest, *guard_args)).rowcount
    if max_age_s is not None:
        result.num_deleted += conn.execute(
            "DELETE FROM trajectories WHERE created_at < ?" + guard,
            (now - max_age_s, *guard_args)).rowcount
    if max_rows is not None:
        row = conn.execute("SELECT seq FROM trajectories ORDER BY seq DESC LIMIT 1 OFFSET ?",
                           (max_rows,)).fetchone()
        if row is not None:  # row[0]: the newest seq that no longer fits under the cap
            if floor:
                result.num_deleted += conn.execute(
                    "DELETE FROM trajectories WHERE seq <= ?", (min(row[0], floor),)).rowcount
            result.num_evicted_unacked = conn.execute(
                "DELETE FROM trajectories WHERE seq <= ?", (row[0],)).rowcount
    return result
