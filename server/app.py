"""The FastAPI application: ``create_app(settings)``, its lifespan (which loads the model and
starts the engine loop), the body-size guard and the error handlers."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from e3rl.engine.async_engine import AsyncEngine
from e3rl.engine.client import EngineClient
from e3rl.engine.core_client import EngineCoreClient

from .deps import get_engine, get_metrics, get_settings
from .drain import Drain
from .errors import install_error_handlers
from .logprobs import TokenText
from .metrics import Metrics
from .ports import AdminPortSplit
from .protocol import ErrorResponse, error_body
from .recorder import TrajectoryRecorder
from .routes import (admin, chat, completions, feedback, health, models, tokenize,
                     trajectories, upload)
from .settings import Settings
from .trajectory_store import TrajectoryStore
from .upload import default_max_upload_bytes

logger = logging.getLogger(__name__)

__all__ = ["create_app", "get_engine", "get_settings", "get_metrics"]


class BodySizeLimit:
    """Answer 413 to a body over ``max_bytes``: at once when Content-Length says so,
    otherwise (chunked uploads) as soon as the running total passes the limit. The routes in
    ``exempt_paths`` (exact paths) stream their bodies under a cap of their own."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_reject=None,
                 exempt_paths: frozenset[str] = frozenset()):
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject
        self.exempt_paths = exempt_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt_paths:
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _drain(receive)
            return await self._reject(send)
        if length is not None:
            return await self.app(scope, receive, send)
        # No length given: buffer the body (up to the limit) and replay it.
        messages: list[Message] = []
        total = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                if message.get("more_body", False):
                    await _drain(receive)
                return await self._reject(send)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Send) -> None:
        if self.on_reject is not None:
            self.on_reject()
        body = json.dumps(error_body(f"request body too large (limit {self.max_bytes} bytes)",
                                     "invalid_request_error", code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


_DRAIN_MAX_BYTES = 64 * 1024 * 1024
_DRAIN_MAX_S = 5.0


async def _drain(receive: Receive) -> None:
    """Read and discard the rest of a refused body (bounded in bytes and time) *before*
    answering: once the response is complete the server stops reading and closes, and
    closing a socket with unread data makes the kernel send a reset, which can destroy the
    413 before the client reads it. (After the response, ``receive`` only reports a
    disconnect, so draining then is too late.)"""
    async def drain() -> None:
        total = 0
        while total < _DRAIN_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            total += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(drain(), _DRAIN_MAX_S)
    except asyncio.TimeoutError:
        pass


def create_app(settings: Settings | None = None, engine: EngineClient | None = None) -> FastAPI:
    """The server. Without ``engine`` the lifespan loads ``settings``' model and owns the
    engine; with one (tests, embedding) the caller starts and stops it."""
    settings = settings if settings is not None else Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = None
        store = await asyncio.to_thread(open_store, settings)
        if store is not None:
            app.state.store = store
            app.state.recorder = TrajectoryRecorder(store, settings.model_name,
                                                    app.state.metrics, settings.store_wait_s)
        try:
            if app.state.engine is None:
                settings.check_model()
                config = settings.engine_config()
                logger.info("loading %s (served as %r)", config.model, settings.model_name)
                kind = EngineCoreClient if settings.engine_process else AsyncEngine
                owned = await asyncio.to_thread(kind, config)
                owned.start()
                _attach(app, owned)
                logger.info("engine ready (%s): context %d tokens, %d KV blocks",
                            "its own process" if settings.engine_process else "in process",
                            owned.max_model_len, owned.latest_stats.num_kv_blocks)
            yield
        finally:
            if owned is not None:
                logger.info("stopping the engine")
                await asyncio.to_thread(owned.shutdown)
            if store is not None:
                # After the engine: every trajectory already queued is committed (drained).
                app.state.recorder = None
                await asyncio.to_thread(store.close)

    app = FastAPI(title="e3rl", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server of the e3rl engine.")
    app.state.settings = settings
    app.state.started_at = int(time.time())
    app.state.engine = None
    app.state.store = None
    app.state.recorder = None
    app.state.weights_lock = asyncio.Lock()
    app.state.drain = Drain()  # started by SIGTERM (runner.DrainingServer)
    app.state.metrics = Metrics(settings.model_name, lambda: app.state.engine,
                                lambda: app.state.store, lambda: app.state.drain.is_draining)
    if engine is not None:
        _attach(app, engine)
    install_error_handlers(app)
    api = _errors(400, 401, 404, 413, 500, 503)
    routers = {completions: api, chat: api, models: api, tokenize: api,
               health: _errors(401, 503), trajectories: _errors(400, 401, 404, 409, 500),
               feedback: _errors(400, 401, 404, 413, 500),
               admin: _errors(400, 401, 403, 404, 409, 500),
               upload: _errors(400, 401, 403, 404, 409, 413, 500)}
    for module, responses in routers.items():
        app.include_router(module.router, responses=responses)
    app.openapi = partial(_openapi, app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes,
                       on_reject=lambda: app.state.metrics.record_error(413),
                       exempt_paths=frozenset({upload.UPLOAD_PATH}))
    if settings.admin_port is not None:  # added last: the outermost layer
        admin_paths = frozenset(route.path for module in (trajectories, admin, upload)
                                for route in module.router.routes)
        app.add_middleware(AdminPortSplit, admin_port=settings.admin_port,
                           admin_paths=admin_paths,
                           on_reject=lambda: app.state.metrics.record_error(404))
    return app


_ERROR_DESCRIPTIONS = {
    400: "invalid request (the message and `param` name the field)", 401: "missing or wrong key",
    403: "forbidden by the server's configuration", 404: "unknown model or route, or admin "
    "routes off", 409: "a weight update is already running, or an ack names a replaced "
    "store", 413: "request body too large",
    500: "internal error (no details leak)", 503: "queue full or server draining (see "
    "Retry-After), or engine down",
}


def _errors(*codes: int) -> dict[int, dict]:
    """OpenAPI entries for the OpenAI-format errors a router answers with."""
    return {c: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[c]} for c in codes}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without its default 422 answers: validation errors are 400s here."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=app.description)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


def open_store(settings: Settings) -> TrajectoryStore | None:
    """The trajectory store in ``settings.data_dir``. With ``--store none`` an existing
    store is still opened, read-only in effect (its records stay pullable), and none is
    created."""
    if settings.store == "none" and not settings.store_path.exists():
        return None
    return TrajectoryStore(settings.store_path, mode=settings.store,
                           max_queue=settings.store_max_queue,
                           retention_rows=settings.store_retention_rows,
                           retention_age_s=settings.store_retention_age_s,
                           max_rows=settings.store_max_rows,
                           synchronous=settings.store_synchronous)


def _attach(app: FastAPI, engine: EngineClient) -> None:
    app.state.engine = engine
    app.state.token_text = TokenText(engine.tokenizer)
    settings: Settings = app.state.settings
    healing = settings.healing_defaults()
    logger.info("self-healing by default: %s for %s (source: %s)",
                "on" if healing.is_on else "off", healing.applies_to, healing.source)
    app.state.max_upload_bytes = settings.max_upload_bytes or default_max_upload_bytes(
        engine.num_checkpoint_bytes)
    if settings.checkpoint_dir is not None:
        logger.info("weight updates from %s; uploads up to %d bytes", settings.checkpoint_dir,
                    app.state.max_upload_bytes)
