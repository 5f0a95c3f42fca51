"""The run's JSONL log: one record per line, flushed and fsynced as written.

On resume the records after the checkpoint's step are dropped (they belong to the steps
that will run again), so a resumed run's log reads as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)


class RunLog:
    def __init__(self, path: Path, after_step: int = 0):
        self.path = Path(path)
        if self.path.exists():
            kept = [line for line in read_records(self.path) if line.get("step", 0) <= after_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a log, in order. A bad last line (a run killed mid-write) is
    skipped with a warning; a bad line elsewhere, or an unreadable file, raises
    ``ValueError``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read log file {str(path)!r}: {exc}") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for index, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if index == len(numbered) - 1:
                logger.warning("%s: ignoring the truncated last line %d", path, number)
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON") from None
        if isinstance(record, dict):
            records.append(record)
    return records
