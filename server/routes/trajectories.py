"""``GET /v1/trajectories``: the pull API of the trajectory store (admin key).

``?after=CURSOR&limit=N`` returns the records committed after ``CURSOR`` in commit order,
each with its ``cursor``, and ``next_cursor`` to pass as ``after`` next time (``after`` itself
when nothing is new). Cursors survive restarts and are never reused, so re-reading a range
gives the same records (each with its unique ``id``). Filters: ``erasures_only=true``,
``weight_version=V``. ``format=jsonl`` (or ``Accept: application/x-ndjson``) answers JSON
Lines, one record per line, with the next cursor in the ``X-Next-Cursor`` header.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from ..auth import require_admin_key
from ..deps import get_store
from ..errors import APIError, invalid
from ..trajectory_store import MAX_FETCH_LIMIT, TrajectoryStore

router = APIRouter(dependencies=[Depends(require_admin_key)])

DEFAULT_LIMIT = 100
JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _int_param(value: str | None, name: str, default: int, low: int, high: int | None) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise invalid(f"{name} must be an integer {bounds}, got {value!r}", param=name)
    return number


def _with_cursor(seq: int, body: str) -> str:
    """The stored JSON object with its ``cursor`` added, without parsing it again."""
    return f'{{"cursor":{seq},{body[1:]}'


@router.get("/v1/trajectories")
async def list_trajectories(request: Request, after: str | None = None,
                            limit: str | None = None,
                            fmt: str | None = Query(None, alias="format"),
                            erasures_only: str | None = None,
                            weight_version: str | None = None,
                            store: TrajectoryStore | None = Depends(get_store)) -> Response:
    if store is None:
        raise APIError(404, "the trajectory store is off (--store none)", "not_found_error",
                       code="store_disabled")
    cursor = _int_param(after, "after", 0, 0, None)
    count = _int_param(limit, "limit", DEFAULT_LIMIT, 1, MAX_FETCH_LIMIT)
    if fmt not in (None, "json", "jsonl"):
        raise invalid(f"format must be 'json' or 'jsonl', got {fmt!r}", param="format")
    flag = (erasures_only or "false").lower()
    if flag not in _TRUE + _FALSE:
        raise invalid(f"erasures_only must be true or false, got {erasures_only!r}",
                      param="erasures_only")
    accept = request.headers.get("accept", "")
    jsonl = fmt == "jsonl" or (fmt is None and any(t in accept for t in JSONL_TYPES))
    # A pull may read thousands of rows: off the event loop.
    rows, next_cursor = await asyncio.to_thread(store.fetch_raw, cursor, count,
                                                erasures_only=flag in _TRUE,
                                                weight_version=weight_version)
    headers = {"X-Next-Cursor": str(next_cursor)}
    if jsonl:
        body = "".join(_with_cursor(seq, text) + "\n" for seq, text in rows)
        return Response(body, media_type="application/x-ndjson", headers=headers)
    data = ",".join(_with_cursor(seq, text) for seq, text in rows)
    body = f'{{"object":"list","data":[{data}],"next_cursor":{next_cursor}}}'
    return Response(body, media_type="application/json", headers=headers)
