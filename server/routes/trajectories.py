"""The pull API of the trajectory store (admin key): ``GET /v1/trajectories`` and
``POST /v1/trajectories/ack``.

``GET /v1/trajectories?after=CURSOR&limit=N`` returns the records committed after ``CURSOR``
in commit order, each with its ``cursor`` and its ``feedback`` (``{"reward", "reference",
"received_at"}`` from ``POST /v1/feedback``, or null), and ``next_cursor`` to pass as
``after`` next time (``after`` itself when nothing is new), ``last_cursor`` (the newest cursor
the store has assigned: ``last_cursor - next_cursor`` is the consumer's backlog), and
``store_id``. Cursors survive
restarts and are never reused, so re-reading a range gives the same records (each with its
unique ``id``). Filters: ``erasures_only=true``, ``weight_version=V``. ``settled_s=S`` returns
only the leading run of records at least ``S`` seconds old and stops at the first younger one
(the cursor never passes it), so a consumer can let feedback arrive before it reads a record.
``format=jsonl`` (or ``Accept: application/x-ndjson``) answers JSON Lines, one record per
line, with the next cursor in the ``X-Next-Cursor`` header.

Every answer carries the store's id in the ``X-E3RL-Store-Id`` header: a random id made once
per store file, so a consumer that kept a cursor can tell that the store was replaced (a new
data directory starts its cursors from 1 again).

``POST /v1/trajectories/ack`` with ``{"consumer": "trainer", "cursor": N, "store_id": ...}``
records that the consumer has used every record up to ``N``; answer ``{"object":
"trajectories.ack", "consumer", "cursor", "store_id"}`` with the consumer's stored cursor
(acks are monotonic: a smaller cursor leaves it). Once any consumer has acknowledged,
retention deletes only records up to the smallest acknowledged cursor (the hard cap
``--store-max-rows`` excepted). A ``store_id`` other than this store's is a 409
``store_mismatch``; a cursor beyond the newest record's is a 400.
"""

from __future__ import annotations

import asyncio
import json
import math

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..auth import require_admin_key
from ..deps import get_store
from ..errors import APIError, invalid
from ..trajectory_store import MAX_CONSUMER_NAME_LENGTH, MAX_FETCH_LIMIT, TrajectoryStore

router = APIRouter(dependencies=[Depends(require_admin_key)])

DEFAULT_LIMIT = 100
JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")
STORE_ID_HEADER = "X-E3RL-Store-Id"


class AckRequest(BaseModel):
    """The body of ``POST /v1/trajectories/ack`` (strict: no coercion, no unknown fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    consumer: str = Field(min_length=1, max_length=MAX_CONSUMER_NAME_LENGTH,
                          description="the consumer's name, e.g. 'trainer'")
    cursor: int = Field(ge=0, description="every record up to this cursor has been used")
    store_id: str | None = Field(None, max_length=128, description="the store id the cursor "
                                 "was read from (X-E3RL-Store-Id); a different one is refused "
                                 "(409)")

    @field_validator("consumer")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("must be printable text (no control characters)")
        return value


class AckResponse(BaseModel):
    object: str = "trajectories.ack"
    consumer: str
    cursor: int
    store_id: str


def _require_store(store: TrajectoryStore | None) -> TrajectoryStore:
    if store is None:
        raise APIError(404, "the trajectory store is off (--store none)", "not_found_error",
                       code="store_disabled")
    return store


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


def _float_param(value: str | None, name: str) -> float | None:
    """A finite float >= 0, or None when absent."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise invalid(f"{name} must be a finite number >= 0, got {value!r}", param=name)
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
                            settled_s: str | None = None,
                            store: TrajectoryStore | None = Depends(get_store)) -> Response:
    store = _require_store(store)
    try:
        cursor = _int_param(after, "after", 0, 0, None)
        count = _int_param(limit, "limit", DEFAULT_LIMIT, 1, MAX_FETCH_LIMIT)
        settled = _float_param(settled_s, "settled_s")
        if fmt not in (None, "json", "jsonl"):
            raise invalid(f"format must be 'json' or 'jsonl', got {fmt!r}", param="format")
        flag = (erasures_only or "false").lower()
        if flag not in _TRUE + _FALSE:
            raise invalid(f"erasures_only must be true or false, got {erasures_only!r}",
                          param="erasures_only")
    except APIError as exc:
        exc.headers = {**(exc.headers or {}), STORE_ID_HEADER: store.store_id}
        raise
    accept = request.headers.get("accept", "")
    jsonl = fmt == "jsonl" or (fmt is None and any(t in accept for t in JSONL_TYPES))
    # A pull may read thousands of rows: off the event loop.
    rows, next_cursor = await asyncio.to_thread(store.fetch_raw, cursor, count,
                                                erasures_only=flag in _TRUE,
                                                weight_version=weight_version,
                                                settled_s=settled)
    last_cursor = await asyncio.to_thread(store.last_cursor)
    headers = {"X-Next-Cursor": str(next_cursor), "X-Last-Cursor": str(last_cursor),
               STORE_ID_HEADER: store.store_id}
    if jsonl:
        body = "".join(_with_cursor(seq, text) + "\n" for seq, text in rows)
        return Response(body, media_type="application/x-ndjson", headers=headers)
    data = ",".join(_with_cursor(seq, text) for seq, text in rows)
    body = (f'{{"object":"list","data":[{data}],"next_cursor":{next_cursor},'
            f'"last_cursor":{last_cursor},"store_id":{json.dumps(store.store_id)}}}')
    return Response(body, media_type="application/json", headers=headers)


@router.post("/v1/trajectories/ack", response_model=AckResponse)
async def ack_trajectories(req: AckRequest, store: TrajectoryStore | None = Depends(get_store)
                           ) -> Response:
    store = _require_store(store)
    headers = {STORE_ID_HEADER: store.store_id}
    if req.store_id is not None and req.store_id != store.store_id:
        raise APIError(409, f"the store_id given is not this store's ({store.store_id}): the "
                       "store was replaced, so the cursor belongs to another store; restart "
                       "from this store's cursors", "conflict_error",
                       param="store_id", code="store_mismatch", headers=headers)
    try:
        cursor = await asyncio.wrap_future(store.ack(req.consumer, req.cursor))
    except ValueError as exc:  # beyond the newest cursor
        raise APIError(400, str(exc), param="cursor", headers=headers) from None
    answer = AckResponse(consumer=req.consumer, cursor=cursor, store_id=store.store_id)
    return Response(answer.model_dump_json(), media_type="application/json", headers=headers)
