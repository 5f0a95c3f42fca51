"""``--admin-port``: the admin and trajectory routes on a port of their own.

With ``--admin-port`` one uvicorn server listens on two sockets (same ``--host``) and serves
one app: one engine, one trajectory store, one lifespan, one shutdown for both ports
(``runner.run_app``). ``AdminPortSplit`` routes each request by the local port it arrived on
(the ASGI scope's ``server``, taken from the listening socket, so no client header can change
it): the admin port serves only the admin routes and ``/health`` (so a probe can check it);
the main port answers the admin routes with 404. A Kubernetes NetworkPolicy can then admit only
the trainer to the admin port. The admin key is still required on the admin routes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from .protocol import error_body
from .upload import drain

# Served on the admin port besides the admin routes.
ADMIN_PORT_EXTRA_PATHS = frozenset({"/health"})


class AdminPortSplit:
    """ASGI middleware: the admin routes (``admin_paths``, exact paths, a trailing slash
    ignored) only on ``admin_port``, everything else only on the other port(s). A request
    on the wrong port gets a 404 with an OpenAI error body (``code: wrong_port``)."""

    def __init__(self, app: ASGIApp, admin_port: int, admin_paths: frozenset[str],
                 on_reject: Callable[[], None] | None = None):
        self.app = app
        self.admin_port = admin_port
        self.admin_paths = admin_paths
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        server = scope.get("server")
        on_admin_port = server is not None and server[1] == self.admin_port
        if on_admin_port and path not in self.admin_paths | ADMIN_PORT_EXTRA_PATHS:
            message = ("not found: this is the admin port, which serves only the admin and "
                       "trajectory routes and /health; the API is on the main port")
        elif not on_admin_port and path in self.admin_paths:
            message = ("the admin routes are served on the admin port (--admin-port), not on "
                       "this one")
        else:
            return await self.app(scope, receive, send)
        await _discard_body(scope, receive)
        if self.on_reject is not None:
            self.on_reject()
        body = json.dumps(error_body(message, "not_found_error", code="wrong_port")).encode()
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def _discard_body(scope: Scope, receive: Receive) -> None:
    """Read a refused request's body (bounded, see ``upload.drain``) so that the 404 is not
    destroyed by a reset; not when the client waits for ``100 Continue`` (it would then be
    asked for a body nobody reads)."""
    headers = dict(scope.get("headers") or [])
    if headers.get(b"expect", b"").lower() == b"100-continue":
        return

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return

    await drain(chunks())
