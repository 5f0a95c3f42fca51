"""FastAPI dependencies: the app's engine, settings, metrics and trajectory store (tests
override them)."""

from __future__ import annotations

from fastapi import Request

from e3rl.engine.client import EngineClient
from e3rl.engine.errors import EngineDead

from .metrics import Metrics
from .recorder import TrajectoryRecorder
from .settings import Settings
from .trajectory_store import TrajectoryStore


def get_engine(request: Request) -> EngineClient:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise EngineDead("the engine is not running")
    return engine


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_store(request: Request) -> TrajectoryStore | None:
    """The trajectory store; None when ``--store none`` and no store file exists."""
    return getattr(request.app.state, "store", None)


def get_recorder(request: Request) -> TrajectoryRecorder | None:
    return getattr(request.app.state, "recorder", None)
