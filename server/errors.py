"""Every error leaves the server as one OpenAI error body, ``{"error": {"message", "type",
"param", "code"}}``, with the status that the issue's contract documents:

400 invalid request (the message names the field) · 401 missing or wrong API key ·
404 unknown model or route · 413 body too large · 503 (+ ``Retry-After``) queue full, server
draining (SIGTERM) or engine down · 500 anything else, with a fixed message (never a traceback).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from e3rl.engine.errors import EngineDead, InvalidRequest, QueueFull, StepFailed

from .protocol import error_body

RETRY_AFTER_S = 1


class APIError(Exception):
    """An error the server decided on (unknown model, bad key, unsupported option)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def to_api_error(exc: BaseException) -> APIError:
    """Map any exception to the one error that leaves the server."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequest):
        return APIError(400, exc.message, param=exc.param)
    if isinstance(exc, QueueFull):
        return APIError(503, str(exc), "server_overloaded", code="queue_full",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineDead):
        return APIError(503, str(exc), "service_unavailable", code="engine_dead",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, StepFailed):
        return APIError(500, str(exc), "internal_error", code="engine_step_failed")
    return APIError(500, "internal server error", "internal_error", code="internal_error")


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem of a request body, naming its field."""
    errors = exc.errors()
    if not errors:
        return invalid("invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return invalid(f"the body is not valid JSON: {first.get('msg', '')}".rstrip(": "))
    if not loc:
        return invalid(f"invalid request body: {first.get('msg', '')}")
    field = loc[0]
    if first.get("type") == "extra_forbidden":
        return invalid(f"unknown field {'.'.join(loc)!r}", param=field)
    same_field = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1]
                  == [field]]
    if len(same_field) > 1 and field == "prompt":
        return invalid("prompt must be a string, a list of strings, a list of token ids or a "
                       "list of token-id lists", param=field)
    # Drop pydantic's union branch names ("list[int]") from the location.
    path = ".".join(p for p in loc if "[" not in p and "|" not in p)
    return invalid(f"invalid value for {path!r}: {first.get('msg', 'invalid')}", param=field)


def error_response(request: Request, error: APIError) -> JSONResponse:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.record_error(error.status)
    return JSONResponse(error_body(error.message, error.type, error.param, error.code),
                        status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        # A 500's traceback goes to the server's log (Starlette re-raises it to uvicorn),
        # never to the client.
        return error_response(request, to_api_error(exc))

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, validation_error(exc))

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(request, APIError(exc.status_code, str(exc.detail), type_,
                                                headers=getattr(exc, "headers", None)))

    for cls in (APIError, InvalidRequest, QueueFull, EngineDead, StepFailed, Exception):
        app.add_exception_handler(cls, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
