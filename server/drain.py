"""The drain before a shutdown: what SIGTERM changes while the server still answers.

Kubernetes removes a pod from its Service when the readiness probe fails, and only later, at
the end of the pod's grace period, kills it. So on SIGTERM the server keeps listening and
serving, but ``/ready`` answers 503 and new completion and chat requests are refused (503 with
``Retry-After``: the client retries on another replica), while the requests already running
finish. ``runner.DrainingServer`` waits for them (``--drain-timeout-s``), aborts those still
running at the deadline, and only then lets uvicorn close its sockets and the lifespan flush
the trajectory store.

A request counts as running from its admission (``admit``) until every engine request behind
it has ended (its pump task is done): a finished request's trajectory is committed before its
last delta is released (``serving.Generation``), so a drained request is also a stored one.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING

from .errors import RETRY_AFTER_S, APIError

if TYPE_CHECKING:
    from .serving import Generation


class Drain:
    """Whether the server is draining, and the generations that are still running.

    ``start`` is called from a signal handler (between two bytecodes of the event loop's
    thread), so it only flips plain attributes: no locks, no logging, no awaiting.
    """

    def __init__(self) -> None:
        self.is_draining = False
        self.started_at: float | None = None  # time.monotonic() of start()
        # Weak: a generation whose response was dropped unread (a client gone before its
        # stream began) must not be waited for, nor kept alive, by the drain.
        self._generations: weakref.WeakSet[Generation] = weakref.WeakSet()

    def start(self) -> None:
        """From now on ``/ready`` answers 503 and ``admit`` refuses. Idempotent."""
        if not self.is_draining:
            self.started_at = time.monotonic()
            self.is_draining = True

    def admit(self, gen: Generation) -> None:
        """Track ``gen`` until it ends; 503 (``draining``) once the drain has started. Call it
        right before ``gen.start()``, with no ``await`` in between, so that no request slips
        in unseen after the drain counted the running ones."""
        if self.is_draining:
            raise APIError(503, "the server is shutting down and accepts no new requests; "
                           "retry (another replica will serve it)", "service_unavailable",
                           code="draining", headers={"Retry-After": str(RETRY_AFTER_S)})
        self._generations.add(gen)

    @property
    def num_running(self) -> int:
        """Admitted generations with an engine request still running."""
        return sum(1 for gen in list(self._generations) if gen.is_running)

    def abort_running(self, grace_s: float) -> int:
        """End every running generation with a 503 (a stream gets it as its last event) and
        abort its engine requests; returns how many were aborted (one whose requests have
        all finished and only wait for their trajectories' commit is left to complete)."""
        error = APIError(503, f"the server shut down before this request finished (it ran "
                         f"past the {grace_s:g} s drain period)", "service_unavailable",
                         code="shutdown", headers={"Retry-After": str(RETRY_AFTER_S)})
        return sum(gen.abort(error) for gen in list(self._generations) if gen.is_running)
