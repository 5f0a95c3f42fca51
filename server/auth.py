"""Bearer-key auth, compared in constant time: the optional API key of the serving routes, and
the admin key of the admin routes (off without one)."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request

from .deps import get_settings
from .errors import APIError
from .settings import Settings


def check_api_key(request: Request, settings: Settings) -> None:
    """Raise 401 unless the request carries the configured key (no key set: open)."""
    if settings.api_key is None:
        return
    if not _bearer_matches(request, settings.api_key.get_secret_value()):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                       "authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def _bearer_matches(request: Request, key: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest takes as long for a wrong key as for a right one of the same length.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              key.encode())


async def require_api_key(request: Request, settings: Settings = Depends(get_settings)) -> None:
    check_api_key(request, settings)


async def require_metrics_key(request: Request,
                              settings: Settings = Depends(get_settings)) -> None:
    if settings.metrics_require_auth:
        check_api_key(request, settings)


async def require_admin_key(request: Request, settings: Settings = Depends(get_settings)) -> None:
    """The admin routes: 404 when no admin key is configured (the routes are off), 401
    unless the request carries the admin key (the API key does not open them)."""
    if settings.admin_key is None:
        raise APIError(404, "admin routes are off: start the server with --admin-key (or "
                       "E3RL_ADMIN_KEY) to enable them", "not_found_error",
                       code="admin_disabled")
    if not _bearer_matches(request, settings.admin_key.get_secret_value()):
        raise APIError(401, "missing or invalid admin key: send 'Authorization: Bearer "
                       "ADMIN_KEY'", "authentication_error", code="invalid_admin_key",
                       headers={"WWW-Authenticate": "Bearer"})
