"""The online API: ``LLMEngine.step()`` runs on its own thread; requests stream deltas to
per-request asyncio queues. Adds, aborts and other engine calls (weight swaps, stats) are
applied between two steps, on the engine thread, so the engine is never touched by two
threads at once."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from .config import EngineConfig
from .errors import EngineDead, InvalidRequest, QueueFull, StepFailed
from .llm_engine import EngineStats, LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# A step that raises fails only the requests it was running; this many failing steps in a row
# mean the engine itself is broken, and it stops (EngineDead, /ready 503).
MAX_CONSECUTIVE_STEP_FAILURES = 3


class AsyncEngine:
    """Thread-backed engine for an asyncio server."""

    def __init__(self, config: EngineConfig, engine: LLMEngine | None = None):
        from transformers import AutoTokenizer

        self.config = config
        self.engine = engine if engine is not None else LLMEngine(config)
        # The front end tokenizes with its own tokenizer instance (the engine thread
        # detokenizes with the other one), so the two threads never share one.
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True,
                                                       trust_remote_code=False)
        self.max_model_len = self.engine.max_model_len
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._num_queued = 0  # requests submitted but not yet added by the engine thread
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.num_step_failures = 0  # in a row
        self.latest_stats: EngineStats = self.engine.stats()
        self.step_listeners: list[Callable[[LLMEngine, list[RequestOutput]], None]] = []

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="e3rl-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # -- requests ------------------------------------------------------------------------
    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Check a request without submitting it; returns its prompt token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt must not be empty", param="prompt")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            _, ids = self.engine.tokenize(prompt)
        self.engine.check_lengths(len(ids), params)
        return ids

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its deltas until it finishes. Raises
        ``InvalidRequest``, ``QueueFull`` or ``EngineDead`` before the first delta. Closing
        the iterator early (a client that disconnects) aborts the request."""
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        ids = self.validate(prompt, params)
        with self._lock:
            waiting = self.latest_stats.num_waiting_requests + self._num_queued
            if waiting >= self.config.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests)")
            self._num_queued += 1
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        text = prompt if isinstance(prompt, str) else None
        self._commands.put(("add", request_id, text, ids, params))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def call(self, fn: Callable[[LLMEngine], Any]) -> Future:
        """Run ``fn(engine)`` on the engine thread between two steps."""
        future: Future = Future()
        self._commands.put(("call", fn, future))
        return future

    # -- the engine thread ---------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, text, ids, params = command
            with self._lock:
                self._num_queued -= 1
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
                outputs = self._step() if self.engine.has_unfinished_requests() else []
                for delta in outputs:
                    self._deliver(delta.request_id, delta)
                for listener in self.step_listeners:
                    listener(self.engine, outputs)
                self.latest_stats = self.engine.stats()
        except BaseException as exc:
            logger.exception("engine loop crashed")
            self.error = exc
            dead = EngineDead(f"the engine loop crashed: {type(exc).__name__}")
            for request_id in list(self._streams):
                self._deliver(request_id, dead)
            self._fail_pending_calls(dead)

    def _step(self) -> list[RequestOutput]:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self.num_step_failures += 1
            if self.num_step_failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                raise
            running = sorted({s.request_id for s in self.engine.scheduler.running})
            logger.exception("engine step failed (%d in a row); aborting the %d running "
                             "request(s), serving on", self.num_step_failures, len(running))
            message = (f"the engine failed while running this request ({type(exc).__name__}); "
                       "it was aborted")
            for request_id in running:
                self.engine.abort(request_id)
                self._deliver(request_id, StepFailed(message))
            return []
        self.num_step_failures = 0
        return outputs

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
