"""What every weight update shares, whatever the checkpoint's source (a directory inside
``--checkpoint-dir``, or a file uploaded in the request body): the feature switch, one update
at a time, the swap on the engine thread, and the refusal that leaves the old weights serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import torch
from fastapi import Request

from e3rl.engine import WeightUpdateError
from e3rl.engine import weights as checkpoint
from e3rl.engine.async_engine import AsyncEngine

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


def validate(engine: AsyncEngine, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``WeightUpdateError`` unless ``tensors`` fits the served model. Safe off the
    engine thread: it only reads the model's parameter names, shapes and dtypes."""
    checkpoint.validate(engine.engine.runner.model, tensors)


async def swap(engine: AsyncEngine, tensors: dict[str, torch.Tensor], version: str) -> float:
    """Copy validated ``tensors`` into the model between two engine steps (validated again
    there, all or nothing) and publish the new version; returns the seconds it took."""
    t0 = time.monotonic()

    def apply(e) -> None:  # on the engine thread
        e.update_weights(tensors, version)
        engine.latest_stats = e.stats()  # /v1/models and /metrics see it at once

    await asyncio.wrap_future(engine.call(apply))
    return time.monotonic() - t0


def refused(exc: WeightUpdateError, version: str, previous: str, source: str,
            param: str | None) -> APIError:
    """The 400 of a refused checkpoint (logged): the reason, and the version still served."""
    logger.warning("weight update to version %s from %s refused: %s (still serving %s)",
                   version, source, exc, previous)
    return APIError(400, f"checkpoint refused: {exc}; still serving version {previous}",
                    param=param, code="invalid_checkpoint")
