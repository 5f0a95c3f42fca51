"""One engine step, isolated: a step that raises fails only the requests it was running (they
are aborted, their blocks freed) and the engine serves on; several failing steps in a row mean
the engine itself is broken, and the exception propagates (the loop stops, /ready 503)."""

from __future__ import annotations

import logging

from .errors import StepFailed
from .llm_engine import LLMEngine
from .outputs import RequestOutput

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAILURES = 3


class GuardedStep:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.num_failures = 0  # in a row

    def __call__(self) -> tuple[list[RequestOutput], list[tuple[str, StepFailed]]]:
        """The step's deltas, and the requests it failed with their error."""
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self.num_failures += 1
            if self.num_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            running = sorted({s.request_id for s in self.engine.scheduler.running})
            logger.exception("engine step failed (%d in a row); aborting the %d running "
                             "request(s), serving on", self.num_failures, len(running))
            error = StepFailed(f"the engine failed while running this request "
                               f"({type(exc).__name__}); it was aborted")
            for request_id in running:
                self.engine.abort(request_id)
            return [], [(request_id, error) for request_id in running]
        self.num_failures = 0
        return outputs, []
