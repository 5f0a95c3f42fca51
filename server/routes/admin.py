"""``GET /v1/admin/weights``: the served weight version. ``POST /v1/admin/weights``: hot-swap the served weights from a checkpoint directory on the
server's filesystem (admin key). ``routes/upload.py`` takes the checkpoint in the request
body instead; both share ``server/weight_swap.py``.

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

from .. import weight_swap
from ..auth import require_admin_key
from ..deps import get_engine, get_settings
from ..protocol import WeightUpdateRequest, WeightUpdateResponse, WeightVersionResponse
from ..settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_admin_key)])


def _load(engine: AsyncEngine, path: str, root: Path) -> tuple[Path, dict]:
    """Resolve, read and validate a checkpoint (worker thread; the engine keeps stepping)."""
    try:
        real = checkpoint.resolve_checkpoint_dir(path, root)
    except FileNotFoundError:
        raise WeightUpdateError(f"the checkpoint directory {str(root)!r} does not exist") \
            from None
    tensors = checkpoint.read_safetensors_dir(real)
    weight_swap.validate(engine, tensors)
    return real, tensors


@router.get("/v1/admin/weights", response_model=WeightVersionResponse)
async def weight_version(request: Request, engine: AsyncEngine = Depends(get_engine),
                         settings: Settings = Depends(get_settings)) -> WeightVersionResponse:
    """The served weight version (what ``/v1/models`` says, under the admin key)."""
    return WeightVersionResponse(model=settings.model_name,
                                 version=engine.latest_stats.weight_version,
                                 updating=request.app.state.weights_lock.locked())


@router.post("/v1/admin/weights", response_model=WeightUpdateResponse)
async def update_weights(req: WeightUpdateRequest, request: Request,
                         engine: AsyncEngine = Depends(get_engine),
                         settings: Settings = Depends(get_settings)) -> WeightUpdateResponse:
    root = weight_swap.checkpoint_root(settings)
    async with weight_swap.claim(request):
        previous = engine.latest_stats.weight_version
        logger.info("weight update to version %s from %s requested", req.version, req.path)
        t0 = time.monotonic()
        try:
            path, tensors = await asyncio.to_thread(_load, engine, req.path, root)
            load_s = time.monotonic() - t0
            swap_s = await weight_swap.swap(engine, tensors, req.version)
        except WeightUpdateError as exc:
            raise weight_swap.refused(exc, req.version, previous, repr(req.path),
                                      param="path") from None
    logger.info("weights swapped: version %s -> %s from %s (%d tensors; load %.2f s, swap "
                "%.3f s)", previous, req.version, path, len(tensors), load_s, swap_s)
    return WeightUpdateResponse(version=req.version, previous_version=previous, path=str(path),
                                source="path", num_tensors=len(tensors),
                                load_s=round(load_s, 4), swap_s=round(swap_s, 4))
