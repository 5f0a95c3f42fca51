"""``POST /v1/feedback``: a reward, or a reference answer, for one choice of a completion.

Body: ``{"id": "cmpl-...", "index": 0, "reward": 1.0}`` or ``{"id": ..., "index": ...,
"reference": "42"}``. ``id`` is the ``id`` of a ``/v1/completions`` or
``/v1/chat/completions`` response and ``index`` (default 0) the choice's ``index`` in it;
exactly one of ``reward`` (a finite number) and ``reference`` (text the trainer grades the
choice against: the server grades nothing). The feedback is attached to the choice's stored
trajectory (a later one replaces it) and the pull API (``GET /v1/trajectories``) returns it in
the record's ``feedback``. Guarded by the API key, like the completion routes.

Answers: 200 ``{"object": "feedback", "id", "index", "trajectory_id", "reward",
"reference"}`` once committed; 400 for a bad body, naming the field in ``param``; 404
``trajectory_not_found`` when no stored trajectory has that choice (unknown id, or its
trajectory was not stored: ``--store erasures``, retention); 404 ``store_disabled`` when the
server has no store; 507 ``store_full`` when the store's disk is full (retry later). Each
request that passed authentication counts once in
``e3rl_feedback_total{result="stored"|"not_found"|"invalid"}``.

Limitation: a completion with ``best_of > n`` returns the ``n`` most likely of ``best_of``
samples per prompt, and its stored records know only ``best_of`` (their ``n``), so a choice
index cannot be mapped to its sample; feedback on such a completion lands on the wrong
trajectory. Do not send feedback for ``best_of`` completions.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..auth import require_api_key
from ..deps import get_metrics, get_store
from ..errors import APIError, invalid, validation_error
from ..metrics import Metrics
from ..protocol import ErrorResponse
from ..trajectory_store import TrajectoryStore, TrajectoryStoreError

router = APIRouter(dependencies=[Depends(require_api_key)])

MAX_ID_LENGTH = 256


class FeedbackRequest(BaseModel):
    """The body of ``POST /v1/feedback`` (strict: no coercion, no unknown fields)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH,
                    description="the id of a completion or chat completion response")
    index: int = Field(0, ge=0, description="the choice's index in that response")
    reward: float | None = Field(None, allow_inf_nan=False, description="the choice's "
                                 "reward (finite); or give 'reference'")
    reference: str | None = Field(None, description="a reference answer for the trainer to "
                                  "grade the choice against; or give 'reward'")


class FeedbackResponse(BaseModel):
    object: str = "feedback"
    id: str
    index: int
    trajectory_id: str
    reward: float | None
    reference: str | None


def _parse(body: bytes) -> FeedbackRequest:
    """The validated body, or the 400 that names the offending field."""
    try:
        req = FeedbackRequest.model_validate_json(body or b"null")
    except ValidationError as exc:
        raise validation_error(RequestValidationError(exc.errors())) from None
    if req.reward is None and req.reference is None:
        raise invalid("give either 'reward' (a number) or 'reference' (text)", param="reward")
    if req.reward is not None and req.reference is not None:
        raise invalid("give either 'reward' or 'reference', not both", param="reference")
    return req


# The body is parsed in the handler rather than by FastAPI so that a bad body is counted in
# e3rl_feedback_total; the schema is declared for OpenAPI by hand.
_OPENAPI = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": FeedbackRequest.model_json_schema()}}}}


@router.post("/v1/feedback", response_model=FeedbackResponse, openapi_extra=_OPENAPI,
             responses={507: {"model": ErrorResponse, "description": "the store's disk is "
                              "full"}})
async def post_feedback(request: Request, store: TrajectoryStore | None = Depends(get_store),
                        metrics: Metrics = Depends(get_metrics)) -> FeedbackResponse:
    try:
        req = _parse(await request.body())
    except APIError:
        metrics.record_feedback("invalid")
        raise
    if store is None:
        metrics.record_feedback("not_found")
        raise APIError(404, "the trajectory store is off (--store none): feedback has no "
                       "trajectory to attach to", "not_found_error", code="store_disabled")
    trajectory_id = await asyncio.to_thread(store.resolve_choice, req.id, req.index)
    try:
        is_stored = trajectory_id is not None and await asyncio.wrap_future(
            store.add_feedback(trajectory_id, reward=req.reward, reference=req.reference))
    except TrajectoryStoreError as exc:
        if exc.is_disk_full:  # the operator's problem, and a retry can succeed later
            raise APIError(507, "the feedback could not be stored: the server's disk is full",
                           "server_error", code="store_full") from None
        raise APIError(500, f"the feedback could not be stored: {exc}", "internal_error",
                       code="store_error") from None
    if not is_stored:  # never stored, or deleted by retention since it was resolved
        metrics.record_feedback("not_found")
        raise APIError(404, f"no stored trajectory for choice {req.index} of {req.id!r} "
                       "(unknown id or index, or its trajectory was not stored)",
                       "not_found_error", param="id", code="trajectory_not_found")
    metrics.record_feedback("stored")
    return FeedbackResponse(id=req.id, index=req.index, trajectory_id=trajectory_id,
                            reward=req.reward, reference=req.reference)
