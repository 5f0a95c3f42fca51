"""What a server needs of a running engine, whichever way the engine runs: ``AsyncEngine`` (the
engine loop on a thread of this process) or ``EngineCoreClient`` (the loop in a process of its
own). Requests stream deltas to per-request asyncio queues; closing a stream early aborts its
request. Every method may be called from any thread or event loop."""

from __future__ import annotations

import asyncio
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .config import EngineConfig
from .errors import EngineDead, InvalidRequest, QueueFull
from .limits import RequestLimits
from .llm_engine import EngineStats
from .outputs import RequestOutput
from .sampling_params import SamplingParams

T = TypeVar("T")


@dataclass(slots=True)
class WeightSwapResult:
    version: str
    num_tensors: int
    load_s: float  # reading and validating the checkpoint while the engine kept stepping
    swap_s: float  # the copy into the model, between two steps


class EngineClient(ABC):
    """Requests in, deltas out; stats, liveness and weight swaps."""

    def __init__(self, config: EngineConfig, limits: RequestLimits, stats: EngineStats,
                 num_checkpoint_bytes: int):
        from transformers import AutoTokenizer

        self.config = config
        self.limits = limits
        # The front end tokenizes with its own tokenizer instance (the engine detokenizes with
        # another), so two threads never share one.
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True,
                                                       trust_remote_code=False)
        # Long prompts are tokenized on a thread of their own (``run_tokenizer``), never on
        # the event loop, with a third instance: one thread each, none shared.
        self._prompt_tokenizer = AutoTokenizer.from_pretrained(
            config.model, local_files_only=True, trust_remote_code=False)
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="e3rl-tokenizer")
        self.latest_stats = stats  # a snapshot, replaced (never mutated) by the engine side
        self.num_checkpoint_bytes = num_checkpoint_bytes
        self.error: BaseException | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._num_queued = 0  # requests submitted but not yet taken in by the engine

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    # -- what each kind of engine provides -----------------------------------------------
    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def shutdown(self, timeout_s: float = 10.0) -> None: ...

    @property
    @abstractmethod
    def is_alive(self) -> bool: ...

    @abstractmethod
    def _submit(self, request_id: str, text: str | None, ids: list[int],
                params: SamplingParams) -> None:
        """Hand a validated request to the engine (which calls ``_taken_in`` once it has)."""

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop a request; its last delta (finish reason "abort") reaches its stream."""

    @abstractmethod
    async def update_weights(self, path: Path, version: str) -> WeightSwapResult:
        """Swap in the checkpoint at ``path`` (a directory of safetensors, or one safetensors
        file): read and validated while the engine keeps stepping, copied between two steps,
        all or nothing. Raises ``WeightUpdateError`` (old weights keep serving)."""

    # -- requests ------------------------------------------------------------------------
    async def run_tokenizer(self, fn: Callable[..., T]) -> T:
        """``fn(tokenizer)`` on the tokenizer thread: a 4 MiB prompt takes seconds to
        tokenize, and must not hold up every stream the event loop serves meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, fn, self._prompt_tokenizer)

    def validate(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Check a request without submitting it; returns its prompt token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt must not be empty", param="prompt")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = self.limits.prompt_ids(prompt)
        self.limits.check_lengths(len(ids), params)
        return ids

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams, prompt_ids: list[int] | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its deltas until it finishes. Raises
        ``InvalidRequest``, ``QueueFull`` or ``EngineDead`` before the first delta. Closing
        the iterator early (a client that disconnects) aborts the request. ``prompt_ids``:
        the text prompt's token ids when the caller has them (not tokenized again)."""
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        ids = self.validate(prompt if prompt_ids is None else prompt_ids, params)
        with self._lock:
            waiting = self.latest_stats.num_queued_requests + self._num_queued
            if waiting >= self.config.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests)")
            self._num_queued += 1
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        text = prompt if isinstance(prompt, str) else None
        finished = False
        try:
            try:
                if self.error is not None:  # died since the check: _fail_all may have missed it
                    raise EngineDead("the engine is not running")
                self._submit(request_id, text, ids, params)
            except BaseException:
                self._taken_in()  # it never reached the engine: no longer counted as queued
                raise
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

    # -- for the engine side -------------------------------------------------------------
    def _taken_in(self, num_requests: int = 1) -> None:
        with self._lock:
            self._num_queued -= num_requests

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand each item to its request's stream, in order, with one wake-up of each event
        loop for all of them (a step's deltas: one wake-up, not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, puts in by_loop.items():
            loop.call_soon_threadsafe(_put_all, puts)

    def _fail_all(self, error: BaseException) -> None:
        self._deliver_all([(request_id, error) for request_id in list(self._streams)])


def _put_all(puts: list[tuple[asyncio.Queue, Any]]) -> None:
    for stream, item in puts:
        stream.put_nowait(item)
