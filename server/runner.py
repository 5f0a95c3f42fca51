"""The ``e3rl serve`` process: uvicorn on one port, or two with ``--admin-port``, and the drain
on SIGTERM.

uvicorn alone, on SIGTERM, closes its listening sockets first and then waits (a bounded time)
for the connections it has; a Kubernetes readiness probe would then see a refused connection,
not a 503, and the Service could still route new requests to the pod until the probe's
failures add up. ``DrainingServer`` puts a drain before uvicorn's shutdown:

1. On the first SIGTERM (or SIGINT) ``/ready`` answers 503 at once and new completion and
   chat requests get 503 + ``Retry-After`` (``drain.Drain``), while the server keeps listening
   and the running requests, streams included, go on.
2. When none is left running, or ``--drain-timeout-s`` after the signal, whichever is first,
   the ones still running are aborted (their clients get a 503 error, a stream as its last
   event).
3. uvicorn's own shutdown follows: it closes the sockets, lets the open responses finish (at
   most ``GRACEFUL_SHUTDOWN_S``), and runs the lifespan's end, which stops the engine and
   closes the trajectory store after writing everything queued. The process exits with 0.

A second SIGTERM or SIGINT ends the grace period at once: the running requests are aborted and
the shutdown goes on as in 3 (well under a second), so the store is still flushed. There is no
hard exit without that flush (SIGKILL is one: committed trajectories are safe, queued ones are
lost); a hard exit during start-up could also leave a half-built kernel cache locked and the
next start waiting on the lock. A signal during start-up (the model loading) takes effect once
the model is loaded, as in uvicorn. Each phase is logged.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from .drain import Drain
from .settings import Settings

logger = logging.getLogger(__name__)

# After the drain: how long uvicorn waits for the responses still open (a stream's last
# bytes, the aborted requests' errors) before it cancels them.
GRACEFUL_SHUTDOWN_S = 5.0
# How often the drain checks whether the running requests have finished.
POLL_S = 0.05


class DrainingServer(uvicorn.Server):
    """uvicorn's ``Server`` with a drain between the exit signal and the shutdown (see the
    module docstring). The drain runs as a task started from uvicorn's main loop, which ticks
    every 0.1 s; the signal handler itself only flips flags."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout_s: float):
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self._num_signals = 0
        self._signal_name = ""
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main (event loop) thread between two bytecodes: no logging here (a
        # reentrant write to a buffered stream raises), no awaiting, no locks; the drain task
        # logs. Unlike uvicorn's, this handler does not make the process re-raise the signal
        # at the end, so a drained shutdown exits with 0.
        self._num_signals += 1  # the drain task reads it: a second one ends the grace period
        if self._num_signals == 1:
            self._signal_name = signal.Signals(sig).name
            self.drain.start()  # /ready answers 503 from here on

    async def on_tick(self, counter: int) -> bool:
        if self.drain.is_draining and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain_then_exit())
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        """Wait for the running requests (at most ``drain_timeout_s`` from the signal),
        abort the rest, then let uvicorn shut down."""
        drain = self.drain
        try:
            started = drain.started_at if drain.started_at is not None else time.monotonic()
            deadline = started + self.drain_timeout_s
            logger.info("%s: draining: /ready answers 503 and new completions are refused; "
                        "waiting up to %g s for %d running request(s) (signal again to "
                        "abort them now)", self._signal_name or "shutdown",
                        self.drain_timeout_s, drain.num_running)
            while (drain.num_running and time.monotonic() < deadline
                   and self._num_signals < 2):
                await asyncio.sleep(POLL_S)
            if drain.num_running:
                num_aborted = drain.abort_running(self.drain_timeout_s)
                reason = ("second signal" if self._num_signals >= 2
                          else f"{self.drain_timeout_s:g} s grace period over")
                logger.warning("drain: %s: aborted %d request(s) still running", reason,
                               num_aborted)
            else:
                logger.info("drain: every running request finished (%.1f s)",
                            time.monotonic() - started)
        except Exception:  # never leave the server running because the drain broke
            logger.exception("drain failed; shutting down now")
        finally:
            self.should_exit = True


def run_app(app: FastAPI, settings: Settings) -> None:
    """Serve ``app`` (made by ``create_app(settings)``) until a signal has drained it. With
    ``settings.admin_port`` both ports are bound here, before the model loads (a port in use
    fails at once), and handed to one uvicorn server; ``AdminPortSplit`` tells them apart."""
    options = dict(host=settings.host, log_level=settings.log_level.lower(),
                   access_log=settings.access_log,
                   timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    config = uvicorn.Config(app, port=settings.port, **options)
    server = DrainingServer(config, app.state.drain, settings.drain_timeout_s)
    sockets = None
    if settings.admin_port is not None:
        # bind_socket logs "Uvicorn running on ..." for each, and exits with uvicorn's
        # startup-failure status if the port is taken.
        admin_config = uvicorn.Config(app, port=settings.admin_port, **options)
        sockets = [config.bind_socket(), admin_config.bind_socket()]
        logger.info("admin and trajectory routes on port %d only (API on port %d)",
                    settings.admin_port, settings.port)
    server.run(sockets=sockets)
    logger.info("shutdown complete; exiting")
