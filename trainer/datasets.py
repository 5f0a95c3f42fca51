"""Evaluation data: JSONL or Parquet files with configurable columns, and built-in names.

Built-ins: ``arith-chain:SPLIT`` (``train``, ``validation``, ``test``, ``hard``; a fixed
sample of the split, seed 0). Column defaults follow DeepMath-103K (``question`` /
``final_answer``) and fall back to AIME-style (``problem`` / ``answer``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .arith import SPLITS, TASK_NAME, ArithConfig, format_prompt, generate_rows

QUESTION_COLUMNS = ("question", "problem")
ANSWER_COLUMNS = ("final_answer", "answer")
DEFAULT_BUILTIN_SIZE = 1000


class DataError(ValueError):
    """A data set that cannot be used (the message is one line)."""


@dataclass(slots=True)
class Problem:
    question: str
    answer: str
    prompt: str
    task: str  # "arith" (exact numeric grader) or "math" (math-verify)


def is_builtin(name: str) -> bool:
    return name.startswith(f"{TASK_NAME}:")


def load_problems(data: str, *, limit: int | None = None, question_column: str | None = None,
                  answer_column: str | None = None, prompt_format: str = "auto",
                  arith_config: ArithConfig | None = None) -> list[Problem]:
    """Problems of a built-in name (drawn with ``arith_config``'s knobs, default: the
    split's) or a JSONL / Parquet file."""
    if is_builtin(data):
        split = data.split(":", 1)[1]
        if split not in SPLITS:
            raise DataError(f"unknown {TASK_NAME} split {split!r}; choose from {', '.join(SPLITS)}")
        try:
            rows = generate_rows(split, limit or DEFAULT_BUILTIN_SIZE, seed=0, config=arith_config)
        except ValueError as exc:
            raise DataError(str(exc)) from exc
        return [Problem(r["question"], r["final_answer"], format_prompt(r["question"]), "arith")
                for r in rows]
    rows = _read_rows(Path(data))
    if not rows:
        raise DataError(f"{data}: no rows")
    qcol = _pick_column(rows[0], question_column, QUESTION_COLUMNS, data, "question")
    acol = _pick_column(rows[0], answer_column, ANSWER_COLUMNS, data, "answer")
    problems = []
    for i, row in enumerate(rows[:limit] if limit else rows):
        if qcol not in row or acol not in row:
            raise DataError(f"{data}: row {i + 1} lacks column {qcol!r} or {acol!r}")
        question, answer = str(row[qcol]), str(row[acol])
        arith = prompt_format == "arith" or (prompt_format == "auto" and _looks_arith(question))
        prompt = format_prompt(question) if arith else question
        problems.append(Problem(question, answer, prompt, "arith" if arith else "math"))
    return problems


def _looks_arith(question: str) -> bool:
    return bool(question) and set(question) <= set("0123456789+-*()")


def _pick_column(row: dict, given: str | None, defaults: tuple[str, ...], data: str,
                 what: str) -> str:
    if given is not None:
        if given not in row:
            raise DataError(f"{data}: missing {what} column {given!r} (columns: {sorted(row)})")
        return given
    for name in defaults:
        if name in row:
            return name
    raise DataError(f"{data}: missing {what} column (looked for {', '.join(defaults)}; "
                    f"columns: {sorted(row)})")


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such file (and not a built-in name like {TASK_NAME}:test)")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from exc
        return pq.read_table(path).to_pylist()
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: a row must be a JSON object")
            rows.append(row)
    return rows
