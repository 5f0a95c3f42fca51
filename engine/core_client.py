"""The front end's side of the engine-core process (``core.py``): starts the process, sends
requests, aborts and weight swaps over ZeroMQ, and routes the core's events to the request
streams. A receiver thread reads the events (so any event loop, or none, may use the client);
a core that dies is noticed within ``DEATH_CHECK_S``: its requests fail with ``EngineDead``,
``is_alive`` turns false (``/ready`` 503), nothing waits forever."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future
from pathlib import Path

import msgspec
import zmq

from .client import EngineClient, WeightSwapResult
from .config import EngineConfig
from .core_messages import (Abort, AddRequest, CallResult, Command, CoreDead, Event, Ready,
                            RequestError, Shutdown, StartupFailed, StepOutputs, UpdateWeights)
from .errors import EngineDead, EngineStartError, InvalidRequest, QueueFull, StepFailed, \
    WeightUpdateError
from .outputs import RequestOutput
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DEATH_CHECK_S = 0.1


class EngineCoreClient(EngineClient):
    """An engine whose loop runs in a child process ("e3rl-engine-core")."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 900.0):
        self._dir = tempfile.mkdtemp(prefix="e3rl-core-")  # private (0700): the sockets
        self._context = zmq.Context()
        self._commands = self._context.socket(zmq.PUSH)
        self._events = self._context.socket(zmq.PULL)
        commands_addr, events_addr = f"ipc://{self._dir}/commands", f"ipc://{self._dir}/events"
        self._commands.bind(commands_addr)
        self._events.bind(events_addr)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Event)
        config_path = Path(self._dir) / "config.msgpack"
        config_path.write_bytes(msgspec.msgpack.encode(config))
        # A fresh interpreter (never a fork of a process that runs torch, and unlike
        # multiprocessing's spawn, no re-import of the caller's main module).
        self._proc = subprocess.Popen([
            sys.executable, "-m", "e3rl.engine.core", "--config", str(config_path),
            "--commands", commands_addr, "--events", events_addr,
            "--parent-pid", str(os.getpid()),
            "--log-level", str(logging.getLogger("e3rl").getEffectiveLevel())])
        try:
            ready = self._wait_ready(startup_timeout_s)
        except BaseException:
            if self._alive():
                self._proc.kill()
                _wait(self._proc, 5)
            self._close()
            raise
        self._send_lock = threading.Lock()
        self._calls: dict[int, Future] = {}
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}  # of live requests
        self._next_call_id = 0
        self._num_taken_in = 0
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._death_lock = threading.Lock()
        super().__init__(config, ready.limits, ready.stats, ready.num_checkpoint_bytes)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def _wait_ready(self, timeout_s: float) -> Ready:
        waited = 0.0
        while waited < timeout_s:
            if self._events.poll(int(DEATH_CHECK_S * 1000)):
                event = self._decoder.decode(self._events.recv())
                if isinstance(event, Ready):
                    return event
                if isinstance(event, StartupFailed):
                    raise EngineStartError(f"the engine failed to start: {event.message}")
                raise EngineStartError(f"unexpected first message from the engine core: "
                                       f"{type(event).__name__}")
            if not self._alive():
                raise EngineStartError(f"the engine-core process exited during startup (exit "
                                       f"code {self._proc.returncode}); its log says why")
            waited += DEATH_CHECK_S
        raise EngineStartError(f"the engine core was not ready after {timeout_s:.0f} s")

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._receive, name="e3rl-core-events",
                                        daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._closing.set()
        self._tokenizer_thread.shutdown(wait=False)
        if self._alive():
            try:
                self._send(Shutdown())
            except zmq.ZMQError:
                pass
            _wait(self._proc, timeout_s)
            if self._alive():
                logger.warning("the engine core did not stop within %.0f s; killing it",
                               timeout_s)
                self._proc.kill()
                _wait(self._proc, 5)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._close()

    def _close(self) -> None:
        self._commands.close(linger=0)
        self._events.close(linger=0)
        self._context.term()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _alive(self) -> bool:
        return self._proc.poll() is None

    @property
    def error(self) -> BaseException | None:
        """Why the engine is down (``EngineDead``), or None. Checks the process itself, so
        a core killed a moment ago is reported here before the receiver thread notices."""
        if self._error is None and not self._closing.is_set() and not self._alive():
            self._died(f"the engine-core process exited (exit code {self._proc.returncode})")
        return self._error

    @error.setter
    def error(self, value: BaseException | None) -> None:
        self._error = value

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # -- requests and calls --------------------------------------------------------------
    def _send(self, command: Command) -> None:
        data = self._encoder.encode(command)
        with self._send_lock:  # a ZeroMQ socket is not thread-safe
            self._commands.send(data, copy=False)

    def _submit(self, request_id: str, text: str | None, ids: list[int],
                params: SamplingParams) -> None:
        try:
            data = self._encoder.encode(AddRequest(request_id, ids, params))
        except (OverflowError, msgspec.EncodeError) as exc:  # e.g. top_k = 10**30
            raise InvalidRequest(f"a value of the request is out of range ({exc})") from None
        self._prompts[request_id] = (text, ids)  # put back into its deltas (StepOutputs)
        try:
            with self._send_lock:
                self._commands.send(data, copy=False)
        except BaseException:
            self._prompts.pop(request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        if not self._closing.is_set() and self.error is None:
            self._send(Abort(request_id))

    async def update_weights(self, path: Path, version: str) -> WeightSwapResult:
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        future: Future = Future()
        with self._send_lock:
            call_id = self._next_call_id
            self._next_call_id += 1
        self._calls[call_id] = future
        if self.error is not None:  # died since the check: _died may have missed this call
            self._calls.pop(call_id, None)
            raise EngineDead(str(self.error))
        self._send(UpdateWeights(call_id, str(path), version))
        result: CallResult = await asyncio.wrap_future(future)
        if result.error is not None:
            raise WeightUpdateError(result.error)
        return WeightSwapResult(version, result.num_tensors, result.load_s, result.swap_s)

    # -- the receiver thread -------------------------------------------------------------
    def _receive(self) -> None:
        try:
            while not self._closing.is_set():
                if self._events.poll(int(DEATH_CHECK_S * 1000)):
                    self._handle(self._decoder.decode(self._events.recv(copy=False).buffer))
                elif not self._alive():
                    if not self._closing.is_set():
                        self._died(f"the engine-core process exited (exit code "
                                   f"{self._proc.returncode})")
                    return
        except BaseException as exc:  # a broken event: nothing can be trusted after it
            logger.exception("reading the engine core's events failed")
            self._died(f"reading the engine core's events failed: {type(exc).__name__}")

    def _handle(self, event: Event) -> None:
        if isinstance(event, StepOutputs):
            self.latest_stats = event.stats
            if event.num_taken_in != self._num_taken_in:
                self._taken_in(event.num_taken_in - self._num_taken_in)
                self._num_taken_in = event.num_taken_in
            items: list[tuple[str, RequestOutput | BaseException]] = []
            for error in event.errors:
                self._prompts.pop(error.request_id, None)
                items.append((error.request_id, _exception(error)))
            for delta in event.outputs:
                prompt = self._prompts.pop(delta.request_id, None) if delta.finished \
                    else self._prompts.get(delta.request_id)
                if prompt is not None:
                    delta.prompt, delta.prompt_token_ids = prompt
                items.append((delta.request_id, delta))
            self._deliver_all(items)
        elif isinstance(event, CallResult):
            self.latest_stats = event.stats  # /v1/models and /metrics see a swap at once
            future = self._calls.pop(event.call_id, None)
            if future is not None and future.set_running_or_notify_cancel():
                future.set_result(event)
        elif isinstance(event, CoreDead):
            self._died(event.message)

    def _died(self, message: str) -> None:
        with self._death_lock:  # the receiver thread and a health check may both see it
            if self._error is not None:
                return
            self._error = dead = EngineDead(message)
        logger.error("engine core down: %s", message)
        self._fail_all(dead)
        for call_id in list(self._calls):
            future = self._calls.pop(call_id)
            if future.set_running_or_notify_cancel():
                future.set_exception(dead)


def _exception(error: RequestError) -> Exception:
    if error.kind == "invalid_request":
        return InvalidRequest(error.message, param=error.param)
    if error.kind == "queue_full":
        return QueueFull(error.message)
    return StepFailed(error.message)


def _wait(proc: subprocess.Popen, timeout_s: float) -> None:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
