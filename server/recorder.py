"""From a finished request to committed trajectories, before its response is released.

The front end calls ``TrajectoryRecorder.record`` with a request's final ``RequestOutput``
and holds the response (or the stream's last chunk of that request) until it returns: the
records are queued for the store's group-commit writer and awaited, so a client that saw a
request complete can count on its trajectory surviving a crash. The wait is bounded
(``wait_s``): a slow disk delays a response by at most that much, then the response goes out
anyway and the timeout is logged and counted. A full queue drops the record (the store counts
it); a request never fails because of the store.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from .trajectory import trajectory_records
from .trajectory_store import TrajectoryStore

if TYPE_CHECKING:
    from e3rl.engine import RequestOutput, SamplingParams

    from .metrics import Metrics

logger = logging.getLogger(__name__)

_WARNING_INTERVAL_S = 10.0


class TrajectoryRecorder:
    """Builds a finished request's records and waits (bounded) for their commit."""

    def __init__(self, store: TrajectoryStore, model_name: str, metrics: Metrics,
                 wait_s: float = 5.0):
        self.store = store
        self.model_name = model_name
        self.metrics = metrics
        self.wait_s = wait_s
        self.num_timeouts = 0
        self._last_warning = -math.inf

    @property
    def is_active(self) -> bool:
        """Whether any record may be stored (a front end can skip accumulating outputs)."""
        return self.store.mode != "none"

    async def record(self, result: RequestOutput, params: SamplingParams) -> None:
        """Store ``result``'s samples (as the store's mode says) and wait for the commit, at
        most ``wait_s``. Never raises for a store problem: it is logged and counted."""
        mode = self.store.mode
        if mode == "none" or (mode == "erasures"
                              and not any(o.erasures for o in result.outputs)):
            return
        try:
            futures = [self.store.submit(r) for r in
                       trajectory_records(result, params, self.model_name)]
        except Exception:  # a bug in the record builder must not fail the request
            logger.exception("trajectory of %s could not be built", result.request_id)
            return
        pending = [asyncio.wrap_future(f) for f in futures if not f.done()]
        if not pending:
            return
        t0 = time.monotonic()
        try:
            # Cancelling a wait (timeout) never cancels the write: the writer still commits.
            outcomes = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True),
                                              self.wait_s)
        except TimeoutError:
            self.num_timeouts += 1
            self.metrics.record_trajectory_timeout()
            self._warn("trajectory of %s not committed after %.1f s; response released "
                       "(%d timeout(s) in total)", result.request_id, self.wait_s,
                       self.num_timeouts)
            return
        self.metrics.record_trajectory_wait(time.monotonic() - t0)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):  # counted in the store's num_failed
                self._warn("trajectory of %s not stored: %s", result.request_id, outcome)
                return

    def _warn(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARNING_INTERVAL_S:
            self._last_warning = now
            logger.warning(message, *args)
