"""What every weight update shares, whatever the checkpoint's source (a directory inside
``--checkpoint-dir``, or a file uploaded in the request body): the feature switch, one update
at a time, and the refusal that leaves the old weights serving. The swap itself is the
engine's (``EngineClient.update_weights``: read and validated while the engine keeps stepping,
copied between two steps, all or nothing)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import Request

from e3rl.engine import WeightUpdateError

from .errors import APIError
from .settings import Settings

logger = logging.getLogger(__name__)


def checkpoint_root(settings: Settings) -> Path:
    """``--checkpoint-dir``; 403 when it is unset (weight updates are off)."""
    if settings.checkpoint_dir is None:
        raise APIError(403, "weight updates are off: start the server with --checkpoint-dir "
                       "DIR (or E3RL_CHECKPOINT_DIR)", "permission_error",
                       code="weight_updates_disabled")
    return settings.checkpoint_dir


def claim(request: Request) -> asyncio.Lock:
    """The app's weight-update lock, for ``async with``; 409 if an update holds it.

    The caller must enter it with no ``await`` in between: the check and the acquire then run
    in one step of the event loop, so two updates can never both pass the check."""
    lock: asyncio.Lock = request.app.state.weights_lock
    if lock.locked():
        raise APIError(409, "a weight update is already running; retry when it has finished",
                       "conflict_error", code="weight_update_in_progress")
    return lock


def refused(exc: WeightUpdateError, version: str, previous: str, source: str,
            param: str | None) -> APIError:
    """The 400 of a refused checkpoint (logged): the reason, and the version still served."""
    logger.warning("weight update to version %s from %s refused: %s (still serving %s)",
                   version, source, exc, previous)
    return APIError(400, f"checkpoint refused: {exc}; still serving version {previous}",
                    param=param, code="invalid_checkpoint")
