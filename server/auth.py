"""Optional API-key auth: ``Authorization: Bearer KEY``, compared in constant time."""

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
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = settings.api_key.get_secret_value().encode()
    # compare_digest takes as long for a wrong key as for a right one of the same length.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                       "authentication_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def require_api_key(request: Request, settings: Settings = Depends(get_settings)) -> None:
    check_api_key(request, settings)


async def require_metrics_key(request: Request,
                              settings: Settings = Depends(get_settings)) -> None:
    if settings.metrics_require_auth:
        check_api_key(request, settings)
