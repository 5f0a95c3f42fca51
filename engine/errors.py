"""The engine's exception types. The server maps each to one OpenAI error body and status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequest(EngineError, ValueError):
    """A request the engine will not run. ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class QueueFull(EngineError):
    """The bounded waiting queue is full; the caller should retry later."""


class EngineDead(EngineError):
    """The engine loop has stopped (crashed or shut down) and serves no more requests."""


class StepFailed(EngineError):
    """An engine step raised while this request was running: the request was aborted (its
    blocks freed) and the engine goes on serving the others."""


class ModelNotSupported(EngineError):
    """The model directory holds an architecture the engine cannot serve correctly."""


class WeightUpdateError(EngineError):
    """A checkpoint was refused: nothing changed, the old weights keep serving."""


class EngineStartError(EngineError):
    """The engine-core process could not start (the message says why: its own error, or how
    it exited)."""
