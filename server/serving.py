"""What completions and chat share: running the engine requests behind one HTTP request,
streaming their deltas, recording their metrics, and aborting them when the client leaves.

An HTTP request with ``k`` prompts becomes ``k`` engine requests. One pump task per engine
request moves its deltas into a queue; closing the ``Generation`` cancels the pumps, which
closes the engine streams, which aborts the engine requests and frees their KV blocks. With a
trajectory recorder, a pump holds its request's last delta until the request's trajectories
are committed (bounded wait), so neither a response nor a stream's final chunk of a request
goes out before its trajectory is durable. Aborted requests are not recorded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from e3rl.engine import SamplingParams
from e3rl.engine.client import EngineClient
from e3rl.engine.outputs import RequestOutput, merge_delta

from .errors import APIError, to_api_error
from .metrics import Metrics
from .protocol import error_body
from .recorder import TrajectoryRecorder

T = TypeVar("T")
logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The engine does not pause a request whose client stops reading its stream: the output waits
# in the server. Past this many unsent tokens (all samples of the HTTP request) the request is
# aborted and its connection closed, so that a connection holds a bounded amount; a request
# may ask for n=64 x 4,096 tokens with 20 log-probs each (hundreds of MB as Python objects).
# A client that reads keeps its backlog near zero; the socket buffers hold a few MB more.
MAX_UNSENT_TOKENS = 4096
# At most this many tokens go into one write of a stream: a batch is rendered whole and
# handed to the socket's buffer whole, so an unbounded batch (a slow reader's backlog) would
# move the backlog out of sight of MAX_UNSENT_TOKENS and hold the event loop while it renders.
MAX_BATCH_TOKENS = 256


@dataclass(slots=True)
class EngineRequest:
    """One prompt of an HTTP request, ready for the engine."""

    request_id: str
    prompt: str | list[int]
    prompt_ids: list[int]
    params: SamplingParams


class ClientDisconnected(Exception):
    """The client went away before the answer was ready."""


class Generation:
    """The engine requests of one HTTP request, their deltas, and their metrics."""

    def __init__(self, engine: EngineClient, metrics: Metrics, requests: list[EngineRequest],
                 recorder: TrajectoryRecorder | None = None):
        self.engine = engine
        self.metrics = metrics
        self.requests = requests
        self.recorder = recorder if recorder is not None and recorder.is_active else None
        self.arrival_s = time.monotonic()
        # Per prompt, its deltas merged (when a consumer or the recorder needs them whole).
        self.results: list[RequestOutput | None] = [None] * len(requests)
        self._accumulate = self.recorder is not None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._buffer: list[tuple[int, RequestOutput]] = []
        self._tasks: list[asyncio.Task] = []
        self._num_open = len(requests)
        self._finished = [False] * len(requests)
        self._num_finished_samples = [0] * len(requests)
        self._got_token = [False] * len(requests)
        self._last_token_s: dict[tuple[int, int], float] = {}
        self._num_unsent_tokens = 0  # in deltas queued for the consumer, not yet taken
        self.is_stalled = asyncio.Event()  # set once MAX_UNSENT_TOKENS is passed

    def start(self, accumulate: bool = False) -> None:
        """Start the engine requests; ``accumulate``: keep each prompt's merged output in
        ``results`` (always done when trajectories are recorded)."""
        self._accumulate = self._accumulate or accumulate
        self._tasks = [asyncio.create_task(self._pump(i, r)) for i, r in enumerate(self.requests)]

    async def _pump(self, i: int, r: EngineRequest) -> None:
        try:
            async for delta in self.engine.generate(r.request_id, r.prompt, r.params,
                                                    prompt_ids=r.prompt_ids):
                self._observe(i, delta)
                if self._accumulate:
                    self.results[i] = merge_delta(self.results[i], delta)
                    # The version of the newest tokens (weights may be swapped mid-request).
                    self.results[i].weight_version = delta.weight_version
                    # A finished request's last delta (its final stream chunk, or the whole
                    # response) is released only once its trajectory is committed.
                    if delta.finished and self.recorder is not None:
                        await self.recorder.record(self.results[i], r.params)
                self._queue.put_nowait((i, delta))
                self._num_unsent_tokens += _num_tokens(delta)
                if self._num_unsent_tokens > MAX_UNSENT_TOKENS and not self.is_stalled.is_set():
                    logger.warning("a stream's client left %d tokens unread: aborting %s and "
                                   "closing its connection", self._num_unsent_tokens,
                                   r.request_id)
                    self.is_stalled.set()
        except Exception as exc:  # delivered to the consumer, which raises it
            self._finished[i] = True  # refused or failed: nothing left to abort
            self._queue.put_nowait((i, exc))
            return
        self._queue.put_nowait((i, None))

    def _observe(self, i: int, delta: RequestOutput) -> None:
        now = time.monotonic()
        for out in delta.outputs:
            if out.token_ids:
                if not self._got_token[i]:
                    self._got_token[i] = True
                    self.metrics.record_latency(now - self.arrival_s, None, None)
                key = (i, out.index)
                if key in self._last_token_s:
                    self.metrics.record_itl(now - self._last_token_s[key], len(out.token_ids))
                self._last_token_s[key] = now
            if out.finish_reason is not None:
                self._num_finished_samples[i] += 1
                self.metrics.record_finished(out)
        if delta.finished:
            self._finished[i] = True
            self.metrics.record_latency(None, now - self.arrival_s,
                                        delta.metrics.get("queue_time_s"))

    async def _next(self) -> tuple[int, RequestOutput] | None:
        """The next delta of any prompt; None when all are done; raises an engine error."""
        while self._num_open:
            i, item = self._took(await self._queue.get())
            if item is None:
                self._num_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                return i, item
        return None

    def _took(self, item: tuple[int, Any]) -> tuple[int, Any]:
        if isinstance(item[1], RequestOutput):
            self._num_unsent_tokens -= _num_tokens(item[1])
        return item

    async def prime(self) -> None:
        """Wait until every prompt has produced its first delta (or error), so that a
        streaming response can still answer a refused request with a proper status."""
        started = set()
        while len(started) < len(self.requests):
            i, item = self._took(await self._queue.get())
            if isinstance(item, BaseException):
                raise item
            started.add(i)
            if item is None:
                self._num_open -= 1
            else:
                self._buffer.append((i, item))

    async def deltas(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._buffer:
            yield self._buffer.pop(0)
        while (item := await self._next()) is not None:
            yield item

    async def delta_batches(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """Like ``deltas``, but what is already queued comes at once (up to
        ``MAX_BATCH_TOKENS``), so that a stream writes to its socket once per wake-up rather
        than once per delta."""
        if self._buffer:
            batch, self._buffer = self._buffer, []
            yield batch
        while self._num_open:
            batch, num_tokens = [], 0
            item = self._took(await self._queue.get())
            while True:
                i, x = item
                if x is None:
                    self._num_open -= 1
                elif isinstance(x, BaseException):
                    if batch:
                        yield batch
                    raise x
                else:
                    batch.append((i, x))
                    num_tokens += _num_tokens(x)
                if self._queue.empty() or num_tokens >= MAX_BATCH_TOKENS:
                    break
                item = self._took(self._queue.get_nowait())
            if batch:
                yield batch

    async def collect(self) -> list[RequestOutput]:
        """Everything, merged: one full ``RequestOutput`` per prompt (``start`` must have
        been told to accumulate)."""
        assert self._accumulate
        async for _ in self.deltas():
            pass
        return self.results  # type: ignore[return-value]

    @property
    def is_running(self) -> bool:
        """Some engine request of this generation has not ended yet (its pump still runs);
        False before ``start``."""
        return any(not task.done() for task in self._tasks)

    def abort(self, error: BaseException) -> bool:
        """End every prompt whose engine request still runs with ``error``, which the
        consumer raises (a response becomes that error, a stream's last event carries it),
        and cancel its pump, which aborts the engine request. A prompt that has finished and
        only waits for its trajectory's commit is left to complete. For the end of a
        shutdown's drain period; the consumer's ``close`` still does the bookkeeping.
        Returns whether anything was aborted."""
        aborted = False
        for i, task in enumerate(self._tasks):
            if not task.done() and not self._finished[i]:
                task.cancel()
                self._queue.put_nowait((i, error))
                aborted = True
        return aborted

    def close(self) -> None:
        """Abort what is still running (the engine frees its blocks); idempotent."""
        for i, task in enumerate(self._tasks):
            if not task.done():
                task.cancel()
            if not self._finished[i]:
                self._finished[i] = True
                n = self.requests[i].params.n
                self.metrics.record_aborted(n - self._num_finished_samples[i])


def _num_tokens(delta: RequestOutput) -> int:
    return sum(len(o.token_ids) for o in delta.outputs)


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first (then raise ClientDisconnected)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientDisconnected()


async def run_generation(request: Request, gen: Generation,
                         stream: bool) -> list[RequestOutput] | None:
    """Start ``gen``. Streaming: wait for every prompt's first delta and return None (the SSE
    body takes over, and closes ``gen``). Otherwise: return everything, merged. Engine errors
    and ``ClientDisconnected`` propagate, with the engine requests aborted. Once the server
    drains (SIGTERM) a new generation is refused with a 503 before it starts."""
    request.app.state.drain.admit(gen)  # no await between this and start(): see Drain.admit
    gen.start(accumulate=not stream)
    if stream:
        request.state.generation = gen  # SSEResponse closes a stalled stream
    try:
        if stream:
            await until_disconnect(request, gen.prime())
            return None
        return await until_disconnect(request, gen.collect())
    except BaseException:
        gen.close()
        raise
    finally:
        if not stream:
            gen.close()


class SSEResponse(StreamingResponse):
    """Server-Sent Events that always watch for the client leaving: its body iterator is
    cancelled on disconnect (whatever the server's ASGI version), which aborts the request.
    A stream whose client stops reading (``Generation.is_stalled``) ends the same way."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]):
        super().__init__(content, headers=SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:
            async def run(fn: Any) -> None:
                await fn()
                group.cancel_scope.cancel()

            gen: Generation | None = scope.get("state", {}).get("generation")
            if gen is not None:
                group.start_soon(run, gen.is_stalled.wait)
            group.start_soon(run, partial(self.stream_response, send))
            await run(partial(wait_for_disconnect, receive))
        if gen is not None and gen.is_stalled.is_set():
            gen.close()  # abort what still runs; the unsent deltas go with the response


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


def check_model(name: str | None, served_name: str) -> None:
    """404 unless ``name`` is the served model (a request may leave it out)."""
    if name is not None and name != served_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                       f"{served_name!r}", "not_found_error", param="model",
                       code="model_not_found")


def room_after(engine: EngineClient, num_prompt_tokens: int) -> int:
    """The most tokens that may follow a prompt (context length and KV pool), at least 1 so
    that an over-long prompt is refused for its length, not for max_tokens."""
    limit = engine.max_model_len
    blocks = getattr(getattr(engine, "engine", None), "block_manager", None)
    if blocks is not None:
        limit = min(limit, blocks.num_blocks * blocks.block_size)
    return max(1, limit - num_prompt_tokens)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def healing_extension(output) -> dict:
    """The ``e3rl`` extension of a finished choice (OpenAI clients ignore it): returned and
    computed tokens, and the erasure events of self-healing."""
    return {"num_output_tokens": len(output.token_ids),
            "num_computed_tokens": output.num_computed_tokens,
            "num_erasures": len(output.erasures),
            "erasures": [dataclasses.asdict(e) for e in output.erasures]}


def fingerprint(weight_version: str) -> str:
    return f"e3rl-w{weight_version}"


def error_event(exc: BaseException, metrics: Metrics) -> str:
    """An error after the stream started: one ``data: {"error": ...}`` event."""
    error = to_api_error(exc)
    if error.status == 500:
        logger.error("error while streaming", exc_info=exc)
    metrics.record_error(error.status)
    return sse(json.dumps(error_body(error.message, error.type, error.param, error.code)))
