"""The engine loop on a thread of this process (``EngineCoreClient`` runs it in a process of
its own). Adds, aborts and other engine calls (weight swaps, stats) are applied between two
steps, on the engine thread, so the engine is never touched by two threads at once."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from . import weights
from .client import EngineClient, WeightSwapResult
from .config import EngineConfig
from .errors import EngineDead
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .step_guard import MAX_CONSECUTIVE_STEP_FAILURES, GuardedStep

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "MAX_CONSECUTIVE_STEP_FAILURES"]


class AsyncEngine(EngineClient):
    """Thread-backed engine for an asyncio server (and for tests that reach into the engine:
    ``.engine`` is the ``LLMEngine`` itself)."""

    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None):
        self.engine = engine if engine is not None else LLMEngine(config)
        super().__init__(config, self.engine.limits, self.engine.stats(),
                         weights.num_checkpoint_bytes(self.engine.runner.model))
        self._commands: queue.Queue = queue.Queue()
        self._step = GuardedStep(self.engine)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.step_listeners: list[Callable[[LLMEngine, list[RequestOutput]], None]] = []

    @property
    def num_step_failures(self) -> int:  # in a row
        return self._step.num_failures

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="e3rl-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._tokenizer_thread.shutdown(wait=False)
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # -- requests and calls --------------------------------------------------------------
    def _submit(self, request_id: str, text: str | None, ids: list[int],
                params: SamplingParams) -> None:
        self._commands.put(("add", request_id, text, ids, params))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Run ``fn(engine)`` on the engine thread between two steps."""
        future: Future = Future()
        self._commands.put(("call", fn, future))
        return future

    async def update_weights(self, path: Path, version: str) -> WeightSwapResult:
        t0 = time.monotonic()
        tensors = await asyncio.to_thread(self._read_and_validate, path)
        t1 = time.monotonic()

        def apply(engine: LLMEngine) -> None:  # on the engine thread
            engine.update_weights(tensors, version)
            self.latest_stats = engine.stats()  # /v1/models and /metrics see it at once

        await asyncio.wrap_future(self.call(apply))
        return WeightSwapResult(version, len(tensors), t1 - t0, time.monotonic() - t1)

    def _read_and_validate(self, path: Path) -> dict:
        # Off the engine thread: validation only reads the parameters' names, shapes, dtypes.
        tensors = weights.read_checkpoint(path)
        weights.validate(self.engine.runner.model, tensors)
        return tensors

    # -- the engine thread ---------------------------------------------------------------
    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, text, ids, params = command
            self._taken_in()
            try:
                self.engine.add_request(request_id, ids, params)
                if text is not None:
                    self.engine.requests[request_id].prompt = text
            except Exception as exc:  # a race the front end's checks could not see
                self._deliver(request_id, exc)
        elif kind == "abort":
            delta = self.engine.abort(command[1])
            if delta is not None:
                self._deliver(command[1], delta)
        elif kind == "call":
            _, fn, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:
                    future.set_exception(exc)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                block = not self.engine.has_unfinished_requests()
                try:
                    command = self._commands.get(timeout=0.5) if block \
                        else self._commands.get_nowait()
                    self._apply(command)
                    while True:
                        self._apply(self._commands.get_nowait())
                except queue.Empty:
                    pass
                outputs, failed = self._step() if self.engine.has_unfinished_requests() \
                    else ([], [])
                self._deliver_all([*failed, *((delta.request_id, delta) for delta in outputs)])
                for listener in self.step_listeners:
                    listener(self.engine, outputs)
                self.latest_stats = self.engine.stats()
        except BaseException as exc:
            logger.exception("engine loop crashed")
            self.error = exc
            dead = EngineDead(f"the engine loop crashed: {type(exc).__name__}")
            self._fail_all(dead)
            self._fail_pending_calls(dead)

    def _fail_pending_calls(self, error: EngineDead) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "call" and command[2].set_running_or_notify_cancel():
                command[2].set_exception(error)
            elif command[0] == "add":
                self._deliver(command[1], error)
