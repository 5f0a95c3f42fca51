"""The engine core: ``LLMEngine``'s loop in a process of its own (the shape of vLLM v1's
EngineCore), so the HTTP front end (tokenizing, streaming, metrics) and the engine never share
a GIL. ``EngineCoreClient`` starts it and talks to it over two ZeroMQ sockets: commands in
(adds, aborts, weight swaps, shutdown), events out (each step's deltas with the engine's
stats, call results). It exits when told to, when its loop crashes (after saying why), or
when its parent is gone."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import msgspec
import zmq

from . import weights
from .config import EngineConfig
from .core_messages import (Abort, AddRequest, CallResult, Command, CoreDead, Event, Ready,
                            RequestError, Shutdown, StartupFailed, StepOutputs, UpdateWeights)
from .errors import InvalidRequest, QueueFull, WeightUpdateError
from .llm_engine import LLMEngine
from .outputs import RequestOutput
from .step_guard import GuardedStep

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 200  # how often an idle core checks that its parent is still there


class EngineCore:
    """The loop: take in every queued command, step, send what the step produced."""

    def __init__(self, engine: LLMEngine, commands: zmq.Socket, events: zmq.Socket,
                 parent_pid: int | None = None):
        self.engine = engine
        self.commands = commands
        self.events = events
        self.parent_pid = parent_pid
        self._decoder = msgspec.msgpack.Decoder(Command)
        self._encoder = msgspec.msgpack.Encoder()
        self._step = GuardedStep(engine)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="e3rl-checkpoint")
        self._swaps: list[tuple[UpdateWeights, Future, float]] = []
        self._num_taken_in = 0
        self._errors: list[RequestError] = []  # sent with the next StepOutputs
        self._deltas: list[RequestOutput] = []  # of aborts, likewise
        self._stop = False
        self.orphaned = False  # stopped because the front end is gone

    def send(self, event: Event) -> None:
        self.events.send(self._encoder.encode(event), copy=False)

    def run(self) -> None:
        try:
            while not self._stop:
                busy = self.engine.has_unfinished_requests() or bool(self._swaps)
                changed = self._take_commands(0 if busy else IDLE_POLL_MS)
                changed |= self._apply_finished_swaps()
                if self._stop:
                    break
                outputs, failed = self._step() if self.engine.has_unfinished_requests() \
                    else ([], [])
                outputs = self._deltas + outputs
                self._deltas = []
                for delta in outputs:
                    delta.prompt_token_ids = []  # the front end has it (StepOutputs)
                self._errors += [RequestError(r, "step_failed", str(e)) for r, e in failed]
                if outputs or self._errors or changed:
                    self.send(StepOutputs(outputs, self._errors, self.engine.stats(),
                                          self._num_taken_in))
                    self._errors = []
                if not busy and not changed and not self._parent_alive():
                    logger.warning("the front end is gone; the engine core exits")
                    self.orphaned = True
                    break
        except BaseException as exc:
            logger.exception("engine loop crashed")
            self.send(CoreDead(f"the engine loop crashed: {type(exc).__name__}"))
            raise
        finally:
            self._loader.shutdown(wait=False, cancel_futures=True)

    def _parent_alive(self) -> bool:
        return self.parent_pid is None or os.getppid() == self.parent_pid

    def _take_commands(self, timeout_ms: int) -> bool:
        if not self.commands.poll(timeout_ms):
            return False
        while True:
            try:
                data = self.commands.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            self._apply(self._decoder.decode(data.buffer))

    def _apply(self, command: Command) -> None:
        if isinstance(command, AddRequest):
            self._num_taken_in += 1
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids,
                                        command.params)
            except InvalidRequest as exc:  # a race the front end's checks could not see
                self._errors.append(RequestError(command.request_id, "invalid_request",
                                                 exc.message, exc.param))
            except QueueFull as exc:
                self._errors.append(RequestError(command.request_id, "queue_full", str(exc)))
        elif isinstance(command, Abort):
            delta = self.engine.abort(command.request_id)
            if delta is not None:
                self._deltas.append(delta)
        elif isinstance(command, UpdateWeights):
            # Read and validated on a worker thread while the loop keeps stepping (validation
            # only reads parameter names, shapes and dtypes); copied between two steps.
            future = self._loader.submit(self._read_and_validate, command.path)
            self._swaps.append((command, future, time.monotonic()))
        elif isinstance(command, Shutdown):
            self._stop = True

    def _read_and_validate(self, path: str) -> dict:
        tensors = weights.read_checkpoint(path)
        weights.validate(self.engine.runner.model, tensors)
        return tensors

    def _apply_finished_swaps(self) -> bool:
        done = [s for s in self._swaps if s[1].done()]
        for swap in done:
            self._swaps.remove(swap)
            command, future, t0 = swap
            t1 = time.monotonic()
            try:
                tensors = future.result()
                self.engine.update_weights(tensors, command.version)
            except WeightUpdateError as exc:
                self.send(CallResult(command.call_id, self.engine.stats(), error=str(exc)))
                continue
            self.send(CallResult(command.call_id, self.engine.stats(),
                                 num_tensors=len(tensors), load_s=t1 - t0,
                                 swap_s=time.monotonic() - t1))
        return bool(done)


def run_engine_core(config: EngineConfig, commands_addr: str, events_addr: str,
                    parent_pid: int | None) -> bool:
    """Start the engine, say ``Ready`` (or ``StartupFailed``), run the loop until told to stop.
    Returns True when it stopped because its front end is gone."""
    context = zmq.Context()
    commands = context.socket(zmq.PULL)
    commands.connect(commands_addr)
    events = context.socket(zmq.PUSH)
    events.connect(events_addr)
    encoder = msgspec.msgpack.Encoder()
    try:
        engine = LLMEngine(config)
    except BaseException as exc:
        logger.exception("the engine failed to start")
        events.send(encoder.encode(StartupFailed(f"{type(exc).__name__}: {exc}")))
        events.close(linger=5000)
        raise SystemExit(1) from None
    # What start-up left alive (the model, transformers' and torch's objects, ~400k of
    # them) never needs collecting again: out of the collector's sight, a full collection
    # no longer walks it (~300 ms, once every few hundred steps at batch 128).
    gc.collect()
    gc.freeze()
    events.send(encoder.encode(Ready(engine.limits, engine.stats(),
                                     weights.num_checkpoint_bytes(engine.runner.model))))
    core = EngineCore(engine, commands, events, parent_pid)
    try:
        core.run()
    finally:
        events.close(linger=2000)
        commands.close(linger=0)
        context.term()
    return core.orphaned


def main() -> None:
    """``python -m e3rl.engine.core``, as ``EngineCoreClient`` starts it (not a user command).
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", required=True, help="the EngineConfig, msgpack-encoded")
    parser.add_argument("--commands", required=True, help="ZeroMQ address to read from")
    parser.add_argument("--events", required=True, help="ZeroMQ address to write to")
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    args = parser.parse_args()
    # Ctrl-C and SIGTERM go to the front end, which drains and then shuts the core down; the
    # core must not die first when a terminal or a container runtime signals the whole group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s [engine core]: %(message)s")
    config = msgspec.msgpack.decode(Path(args.config).read_bytes(), type=EngineConfig)
    if run_engine_core(config, args.commands, args.events, args.parent_pid):
        # A front end that was killed could not remove its private directory (the sockets
        # and this config): the last one out does.
        shutil.rmtree(Path(args.config).parent, ignore_errors=True)


if __name__ == "__main__":
    main()
