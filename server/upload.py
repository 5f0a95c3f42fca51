"""Receiving one large file in a request body (a checkpoint's ``model.safetensors``) without
holding it in memory: streamed into a temporary file, capped in bytes, removed in every case.

A refused body (over the cap, or refused before it was read) is drained, bounded in bytes and
time, *before* the error is sent: once a response is complete the server closes the
connection, and closing a socket with unread data makes the kernel send a reset that can
destroy the error before the client reads it (the reason ``app.BodySizeLimit`` drains too).

A server killed mid-upload (SIGKILL, out of memory) cannot remove its temporary file. Every
upload holds an exclusive ``flock`` on its file until the file is removed, and the kernel
releases it when the process dies, however it dies; so a temporary file that nobody locks is
a dead upload's, and ``remove_stale_uploads`` deletes it (at ``e3rl serve``'s start and before
every upload), even in a checkpoint directory that several servers share.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fastapi import Request
from starlette.requests import ClientDisconnect

from .errors import APIError

logger = logging.getLogger(__name__)

# Room over the model's parameter bytes for the safetensors header (names, shapes, offsets).
UPLOAD_SLACK_BYTES = 16 * 1024 * 1024
# Received bytes are written to disk in batches this big (off the event loop).
_WRITE_BATCH_BYTES = 8 * 1024 * 1024
# An upload that sends nothing for this long is refused (408) and frees the update lock.
STALL_TIMEOUT_S = 60.0
# Draining a refused body stops after this many bytes or seconds.
_DRAIN_MAX_BYTES = 64 * 1024 * 1024
_DRAIN_MAX_S = 5.0
# A temporary upload file's name; one unlocked and older than this is a dead upload's (the age
# covers the moment between creating a file and locking it).
_TEMP_PREFIX, _TEMP_SUFFIX = ".upload-", ".safetensors.partial"
_STALE_MIN_AGE_S = 2.0


def default_max_upload_bytes(num_checkpoint_bytes: int) -> int:
    """The largest upload a valid checkpoint can need: every tensor of the model's state dict
    (``weights.num_checkpoint_bytes``: tied copies included, as a full ``state_dict()``
    carries them) plus slack for the header. Shapes and dtypes never change across swaps, so
    this is computed once."""
    return num_checkpoint_bytes + UPLOAD_SLACK_BYTES


@dataclass(slots=True, frozen=True)
class Upload:
    """A request body received completely into ``path`` (removed when the context exits)."""

    path: Path
    num_bytes: int
    receive_s: float


@asynccontextmanager
async def receive_to_temp_file(request: Request, directory: Path,
                               max_bytes: int) -> AsyncIterator[Upload]:
    """Stream the request body into a new hidden file in ``directory`` (fsynced), at most
    ``max_bytes`` long, and yield it; the file is removed when the context exits, whatever
    happened (refusal, client disconnect, cancellation, error).

    Raises ``APIError`` 413 (over the cap: refused at once from ``Content-Length``, or as soon
    as the running total passes it, then drained), 408 (stalled) or 507 (the file cannot be
    written), and Starlette's ``ClientDisconnect`` when the client goes away mid-body."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        await drain_unread(request)
        raise _too_large(max_bytes)
    t0 = time.monotonic()
    await asyncio.to_thread(remove_stale_uploads, directory)
    try:
        fd, name = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=_TEMP_SUFFIX, dir=directory)
    except OSError as exc:
        raise _storage_failed(directory, exc) from None
    path = Path(name)
    lock_fd = _lock(path)  # held until the file is removed (see the module docstring)
    try:
        try:
            with os.fdopen(fd, "wb") as file:
                num_bytes = await _copy_body(request, file, max_bytes)
                await asyncio.to_thread(_flush_and_sync, file)
        except OSError as exc:
            raise _storage_failed(directory, exc) from None
        yield Upload(path, num_bytes, time.monotonic() - t0)
    finally:
        path.unlink(missing_ok=True)
        if lock_fd is not None:
            os.close(lock_fd)


def _lock(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path`` through a descriptor of its own (the writing one is
    closed before the file is read); None where the file system has no locks."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_uploads(directory: Path) -> int:
    """Delete the temporary files that dead uploads left in ``directory`` (unlocked, and not
    just created), logging each; return how many. A file locked by a live upload, of this
    process or another, is left alone, as is everything that is not a temporary upload."""
    num_removed = 0
    for path in Path(directory).glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
        try:
            if time.time() - path.stat().st_mtime < _STALE_MIN_AGE_S:
                continue
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # gone meanwhile, or unreadable: not ours to judge
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            num_bytes = os.fstat(fd).st_size
            path.unlink(missing_ok=True)
        except OSError:  # locked by a live upload (or no locks here): leave it
            continue
        finally:
            os.close(fd)
        num_removed += 1
        logger.warning("removed %s (%d bytes): the temporary file of an upload whose server "
                       "died before it finished", path, num_bytes)
    return num_removed


async def _copy_body(request: Request, file: BinaryIO, max_bytes: int) -> int:
    """Write the body into ``file`` in batches (in a worker thread: disk writes never block
    the event loop); return its length. At most one batch is held in memory."""
    chunks = request.stream()
    batch = bytearray()
    num_bytes = 0
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(chunks), STALL_TIMEOUT_S)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise APIError(408, f"the upload stalled: no data for {STALL_TIMEOUT_S:g} s",
                               code="upload_timeout", headers={"Connection": "close"}) \
                    from None
            num_bytes += len(chunk)
            if num_bytes > max_bytes:
                await drain(chunks)
                raise _too_large(max_bytes)
            batch += chunk
            if len(batch) >= _WRITE_BATCH_BYTES:
                await asyncio.to_thread(file.write, batch)
                batch = bytearray()
        if batch:
            await asyncio.to_thread(file.write, batch)
    finally:
        await chunks.aclose()
    return num_bytes


def _flush_and_sync(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())


def _storage_failed(directory: Path, exc: OSError) -> APIError:
    """The server cannot write the upload (disk full, no permission): the operator's problem,
    said plainly (no path leaks to the client; the log has it)."""
    logger.error("cannot store an upload in %s: %s", directory, exc)
    return APIError(507, f"the server cannot store the upload: {exc.strerror}", "server_error",
                    code="upload_storage_failed", headers={"Connection": "close"})


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"upload too large (limit {max_bytes} bytes: the served model's "
                    "parameter bytes plus header room, or --max-upload-bytes)",
                    code="request_too_large", headers={"Connection": "close"})


async def drain_unread(request: Request) -> None:
    """Drain the body of a request refused before any of it was read, unless the client
    sent ``Expect: 100-continue`` (curl does for large bodies): it then waits for a ``100
    Continue`` that reading would trigger, and on an early error never sends the body."""
    if request.headers.get("expect", "").lower() != "100-continue":
        await drain(request.stream())


async def drain(chunks: AsyncIterator[bytes]) -> None:
    """Read and discard the rest of a refused body, bounded in bytes and time, so that the
    error sent next is not destroyed by a reset (see the module docstring). A client that
    disconnects meanwhile ends the drain."""
    async def discard() -> None:
        total = 0
        async for chunk in chunks:
            total += len(chunk)
            if total >= _DRAIN_MAX_BYTES:
                return

    try:
        await asyncio.wait_for(discard(), _DRAIN_MAX_S)
    except (asyncio.TimeoutError, ClientDisconnect):
        pass
