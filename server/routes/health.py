"""Operational endpoints: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics``.

``/health`` and ``/ready`` are always open (with ``--admin-port``, ``/health`` answers on both
ports); ``/metrics`` is open unless ``metrics_require_auth`` is set.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..auth import require_metrics_key
from ..deps import get_metrics
from ..metrics import CONTENT_TYPE, Metrics

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the process serves; 503 once the engine loop has crashed (restart me)."""
    engine = getattr(request.app.state, "engine", None)
    if engine is not None and engine.error is not None:
        return JSONResponse({"status": "engine dead"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and the engine loop runs; 503 ``draining`` from the
    moment SIGTERM starts the drain (``server/drain.py``), while the server still answers."""
    drain = getattr(request.app.state, "drain", None)
    if drain is not None and drain.is_draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.is_alive:
        return JSONResponse({"status": "not ready"}, status_code=503)
    return JSONResponse({"status": "ready"})


@router.get("/metrics", dependencies=[Depends(require_metrics_key)],
            response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}},
                                                      "description": "Prometheus text format"}})
async def metrics(m: Metrics = Depends(get_metrics)) -> Response:
    return Response(m.render(), media_type=CONTENT_TYPE)
