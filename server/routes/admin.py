"""``GET /v1/admin/weights``: the served weight version. ``POST /v1/admin/weights``: hot-swap the served weights from a checkpoint directory on the
server's filesystem (admin key). ``routes/upload.py`` takes the checkpoint in the request
body instead; both share ``server/weight_swap.py``.

The checkpoint directory must resolve inside ``--checkpoint-dir`` (no ``..``, no symlink
escape) and hold safetensors only. The engine reads and validates it while it keeps
serving, then copies it in between two steps (``LLMEngine.update_weights``: validated again,
all or nothing). Running sequences keep their
tokens and recompute their KV cache with the new weights, so no request fails or waits for
others to finish, and no sequence attends over KV of two versions. A refused checkpoint is a
400 with the reason, and the old weights keep serving; a second swap while one runs is a 409.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import APIRouter, Depends, Request

from e3rl.engine import WeightUpdateError
from e3rl.engine import weights as checkpoint
from e3rl.engine.client import EngineClient

from .. import weight_swap
from ..auth import require_admin_key
from ..deps import get_engine, get_settings
from ..protocol import WeightUpdateRequest, WeightUpdateResponse, WeightVersionResponse
from ..settings import Settings

logger = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require_admin_key)])


def _resolve(path: str, root: Path) -> Path:
    """The checkpoint directory, confined to ``root`` (no ``..``, no symlink escape)."""
    try:
        real = checkpoint.resolve_checkpoint_dir(path, root)
    except FileNotFoundError:
        raise WeightUpdateError(f"the checkpoint directory {str(root)!r} does not exist") \
            from None
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long: a 400, not a 500
        raise WeightUpdateError(f"the checkpoint path cannot be resolved "
                                f"({getattr(exc, 'strerror', None) or exc})") from None
    _check_files(real, root)
    return real


def _check_files(real: Path, root: Path) -> None:
    """Each checkpoint file, not only its directory, must resolve inside ``root`` and be a
    regular file: a symlinked ``model.safetensors`` would otherwise be read from anywhere, and
    a FIFO would block the read, and the update lock, forever."""
    root_real = root.resolve()
    for file in real.glob("*.safetensors"):
        target = file.resolve()
        if root_real not in target.parents:
            raise WeightUpdateError(f"{file.name} resolves outside the checkpoint directory")
        if not target.is_file():
            raise WeightUpdateError(f"{file.name} is not a regular file")


@router.get("/v1/admin/weights", response_model=WeightVersionResponse)
async def weight_version(request: Request, engine: EngineClient = Depends(get_engine),
                         settings: Settings = Depends(get_settings)) -> WeightVersionResponse:
    """The served weight version (what ``/v1/models`` says, under the admin key)."""
    return WeightVersionResponse(model=settings.model_name,
                                 version=engine.latest_stats.weight_version,
                                 updating=request.app.state.weights_lock.locked())


@router.post("/v1/admin/weights", response_model=WeightUpdateResponse)
async def update_weights(req: WeightUpdateRequest, request: Request,
                         engine: EngineClient = Depends(get_engine),
                         settings: Settings = Depends(get_settings)) -> WeightUpdateResponse:
    root = weight_swap.checkpoint_root(settings)
    async with weight_swap.claim(request):
        previous = engine.latest_stats.weight_version
        logger.info("weight update to version %s from %s requested", req.version, req.path)
        try:
            path = await asyncio.to_thread(_resolve, req.path, root)
            result = await engine.update_weights(path, req.version)
        except WeightUpdateError as exc:
            raise weight_swap.refused(exc, req.version, previous, repr(req.path),
                                      param="path") from None
    logger.info("weights swapped: version %s -> %s from %s (%d tensors; load %.2f s, swap "
                "%.3f s)", previous, req.version, path, result.num_tensors, result.load_s,
                result.swap_s)
    return WeightUpdateResponse(version=req.version, previous_version=previous, path=str(path),
                                source="path", num_tensors=result.num_tensors,
                                load_s=round(result.load_s, 4), swap_s=round(result.swap_s, 4))
