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
    """The records of a log; a truncated last line (a run killed mid-write) is skipped."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                logger.warning("%s: skipping a truncated last line", path)
                continue
            raise ValueError(f"{path}:{n}: not a JSON line") from None
    return records
