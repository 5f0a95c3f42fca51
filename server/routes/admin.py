"""``POST /v1/admin/weights``: hot-swap the served weights (admin key).

The checkpoint directory must resolve inside ``--checkpoint-dir`` (no ``..``, no symlink
escape) and hold safetensors only. It is read and validated in a worker thread while the
engine keeps serving; then the engine copies it in between two steps
(``LLMEngine.update_weights``: validated again, all or nothing). Running sequences keep their
tokens and recompute their KV cache with the new weights, so no request fails or waits for
others to finish, and no sequence attends over KV of two versions. A refused checkpoint is a
400 with the reason, and the old weights keep serving; a second swap while one runs is a 409.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request

from e3rl.engine import WeightUpdateError
from e3rl.engine import weights as checkpoint
from e3rl.engine.async_engine import AsyncEngine

from ..auth import require_admin_key
from ..deps import get_engine, get_settings
from ..errors import APIError
from ..protocol import WeightUpdateRequest, WeightUpdateResponse
from ..settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_admin_key)])


def _load(engine: AsyncEngine, path: str, root: Path) -> tuple[Path, dict]:
    """Resolve, read and validate a checkpoint (worker thread; the engine keeps stepping:
    validation only reads the model's parameter names, shapes and dtypes)."""
    try:
        real = checkpoint.resolve_checkpoint_dir(path, root)
    except FileNotFoundError:
        raise WeightUpdateError(f"the checkpoint directory {str(root)!r} does not exist") \
            from None
    tensors = checkpoint.read_safetensors_dir(real)
    checkpoint.validate(engine.engine.runner.model, tensors)
    return real, tensors


@router.post("/v1/admin/weights", response_model=WeightUpdateResponse)
async def update_weights(req: WeightUpdateRequest, request: Request,
                         engine: AsyncEngine = Depends(get_engine),
                         settings: Settings = Depends(get_settings)) -> WeightUpdateResponse:
    if settings.checkpoint_dir is None:
        raise APIError(403, "weight updates are off: start the server with --checkpoint-dir "
                       "DIR (or E3RL_CHECKPOINT_DIR)", "permission_error",
                       code="weight_updates_disabled")
    lock: asyncio.Lock = request.app.state.weights_lock
    if lock.locked():  # no await between this check and the acquire below: no race
        raise APIError(409, "a weight update is already running; retry when it has finished",
                       "conflict_error", code="weight_update_in_progress")
    async with lock:
        previous = engine.latest_stats.weight_version
        logger.info("weight update to version %s from %s requested", req.version, req.path)
        t0 = time.monotonic()
        try:
            path, tensors = await asyncio.to_thread(_load, engine, req.path,
                                                    settings.checkpoint_dir)
            t1 = time.monotonic()

            def swap(e) -> None:  # on the engine thread, between two steps
                e.update_weights(tensors, req.version)
                engine.latest_stats = e.stats()  # /v1/models and /metrics see it at once

            await asyncio.wrap_future(engine.call(swap))
        except WeightUpdateError as exc:
            logger.warning("weight update to version %s refused: %s (still serving %s)",
                           req.version, exc, previous)
            raise APIError(400, f"checkpoint refused: {exc}; still serving version "
                           f"{previous}", param="path", code="invalid_checkpoint") from None
        t2 = time.monotonic()
    logger.info("weights swapped: version %s -> %s from %s (%d tensors; load %.2f s, swap "
                "%.3f s)", previous, req.version, path, len(tensors), t1 - t0, t2 - t1)
    return WeightUpdateResponse(version=req.version, previous_version=previous, path=str(path),
                                num_tensors=len(tensors), load_s=round(t1 - t0, 4),
                                swap_s=round(t2 - t1, 4))
