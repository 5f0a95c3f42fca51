"""``GET /v1/models``: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from e3rl.engine.client import EngineClient

from ..auth import require_api_key
from ..deps import get_engine, get_settings
from ..errors import APIError
from ..protocol import ModelCard, ModelList
from ..settings import Settings

router = APIRouter(dependencies=[Depends(require_api_key)])


def _card(request: Request, engine: EngineClient, settings: Settings) -> ModelCard:
    return ModelCard(id=settings.model_name, created=request.app.state.started_at,
                     max_model_len=engine.max_model_len,
                     weight_version=engine.latest_stats.weight_version,
                     healing=settings.healing_defaults().describe())


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, engine: EngineClient = Depends(get_engine),
                      settings: Settings = Depends(get_settings)) -> ModelList:
    return ModelList(data=[_card(request, engine, settings)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request, engine: EngineClient = Depends(get_engine),
                    settings: Settings = Depends(get_settings)) -> ModelCard:
    if model_id != settings.model_name:
        raise APIError(404, f"the model {model_id!r} does not exist", "not_found_error",
                       param="model", code="model_not_found")
    return _card(request, engine, settings)
