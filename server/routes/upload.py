"""``POST /v1/admin/weights/upload?version=V``: hot-swap the served weights from a checkpoint
sent in the request body (admin key), so that replicas on other machines need no filesystem
shared with the trainer.

The body is one safetensors file, a checkpoint's ``model.safetensors``, sent raw
(``Content-Type: application/octet-stream``; with a ``Content-Length`` or chunked). It is
streamed into a hidden temporary file inside ``--checkpoint-dir`` (never held whole in
memory), at most ``--max-upload-bytes`` long (default: the served model's parameter bytes plus
16 MiB), then read, validated and swapped in exactly as ``POST /v1/admin/weights`` swaps a
directory. The temporary file is removed in every case. The route is exempt from
``--max-request-bytes`` (``app.BodySizeLimit``), having its own cap.

The update lock is taken before the body is read, so a second update meanwhile is a 409 at
once rather than after a long upload. Every refusal that comes before the body is read drains
it first (bounded), so the client reads the error instead of a connection reset.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.requests import ClientDisconnect

from e3rl.engine import WeightUpdateError
from e3rl.engine.client import EngineClient

from .. import weight_swap
from ..auth import require_admin_key
from ..deps import get_engine, get_settings
from ..errors import APIError, invalid
from ..protocol import MAX_VERSION_LENGTH, ErrorResponse, WeightUpdateResponse
from ..settings import Settings
from ..upload import drain_unread, receive_to_temp_file

logger = logging.getLogger(__name__)

UPLOAD_PATH = "/v1/admin/weights/upload"

router = APIRouter()

_ERRORS = {408: "the upload stalled", 413: "upload over --max-upload-bytes",
           415: "the body is not application/octet-stream",
           507: "the server cannot store the upload (e.g. disk full)"}
_BODY = {"requestBody": {"required": True, "description": "a safetensors file (a checkpoint's "
                         "model.safetensors)",
                         "content": {"application/octet-stream": {
                             "schema": {"type": "string", "format": "binary"}}}}}


def _check_version(version: str | None) -> str:
    if not version:
        raise invalid("version is required: POST /v1/admin/weights/upload?version=V",
                      param="version")
    if len(version) > MAX_VERSION_LENGTH:
        raise invalid(f"version must be at most {MAX_VERSION_LENGTH} characters",
                      param="version")
    return version


def _check_content_type(request: Request) -> None:
    """The body is the raw file: a form or JSON body is a client mistake, refused by name."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type not in ("", "application/octet-stream"):
        raise APIError(415, f"the body must be the raw safetensors file with Content-Type "
                       f"application/octet-stream, not {media_type!r}",
                       code="unsupported_media_type")


@router.post(UPLOAD_PATH, response_model=WeightUpdateResponse, openapi_extra=_BODY,
             responses={c: {"model": ErrorResponse, "description": d}
                        for c, d in _ERRORS.items()})
async def upload_weights(request: Request,
                         version: str | None = Query(None, description="the version the "
                                                     "uploaded weights become (required)"),
                         engine: EngineClient = Depends(get_engine),
                         settings: Settings = Depends(get_settings),
                         ) -> WeightUpdateResponse | Response:
    try:
        await require_admin_key(request, settings)
        root = weight_swap.checkpoint_root(settings)
        version = _check_version(version)
        _check_content_type(request)
        lock = weight_swap.claim(request)
    except APIError:
        await drain_unread(request)
        raise
    async with lock:  # entered right after claim(): no await in between
        previous = engine.latest_stats.weight_version
        if not root.is_dir():
            await drain_unread(request)
            raise weight_swap.refused(
                WeightUpdateError(f"the checkpoint directory {str(root)!r} does not exist"),
                version, previous, "an upload", param=None)
        logger.info("weight upload to version %s started (%s bytes announced)", version,
                    request.headers.get("content-length", "unknown"))
        try:
            async with receive_to_temp_file(request, root,
                                            request.app.state.max_upload_bytes) as body:
                if body.num_bytes == 0:
                    raise WeightUpdateError("the body is empty: send the checkpoint's "
                                            "model.safetensors")
                result = await engine.update_weights(body.path, version)
        except WeightUpdateError as exc:
            raise weight_swap.refused(exc, version, previous, "an upload", param=None) \
                from None
        except ClientDisconnect:
            logger.warning("weight upload to version %s abandoned: the client disconnected "
                           "mid-body (still serving %s)", version, previous)
            return Response(status_code=499)  # nobody is listening
    logger.info("weights swapped: version %s -> %s from an upload (%d bytes, %d tensors; "
                "receive %.2f s, validate %.2f s, swap %.3f s)", previous, version,
                body.num_bytes, result.num_tensors, body.receive_s, result.load_s, result.swap_s)
    return WeightUpdateResponse(version=version, previous_version=previous, source="upload",
                                path=None, num_tensors=result.num_tensors,
                                num_bytes=body.num_bytes, receive_s=round(body.receive_s, 4),
                                load_s=round(result.load_s, 4), swap_s=round(result.swap_s, 4))
