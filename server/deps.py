"""FastAPI dependencies: the app's engine, settings and metrics (tests override them)."""

from __future__ import annotations

from fastapi import Request

from e3rl.engine.async_engine import AsyncEngine
from e3rl.engine.errors import EngineDead

from .metrics import Metrics
from .settings import Settings


def get_engine(request: Request) -> AsyncEngine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise EngineDead("the engine is not running")
    return engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics
