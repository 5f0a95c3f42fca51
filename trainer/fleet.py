"""The replicas a following trainer talks to: discovery, pulls, acks, version checks and
weight uploads, over the servers' admin API (``E3RL_ADMIN_KEY``).

Replicas are named by URL (``--server``), by a file of URLs re-read every poll
(``--servers-file``), or by a DNS name that resolves to one address per replica
(``--servers-dns``, a Kubernetes headless Service). A replica's trajectory store has its own
id (``X-E3RL-Store-Id``); cursors are kept per store id, so a replica that comes back with a
new address keeps its cursor, and one whose store was replaced starts from 0.
"""

from __future__ import annotations

import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from .config import FollowConfig, _host_port

logger = logging.getLogger(__name__)


class ReplicaError(Exception):
    """A replica did not answer as expected (the message says which and why)."""


@dataclass(slots=True)
class Page:
    records: list[dict]
    next_cursor: int
    store_id: str
    last_cursor: int | None = None  # the store's newest cursor, when the server says it


@dataclass(slots=True)
class PushResult:
    url: str
    ok: bool
    attempts: int
    error: str = ""
    seconds: float = 0.0


def discover(config: FollowConfig) -> list[str]:
    """The replicas' base URLs now (order kept, duplicates removed)."""
    urls = [u.rstrip("/") for u in config.servers]
    if config.servers_file:
        try:
            lines = Path(config.servers_file).read_text().splitlines()
        except OSError as exc:
            raise ReplicaError(f"cannot read --servers-file {config.servers_file}: "
                               f"{exc.strerror}") from exc
        urls += [line.strip().rstrip("/") for line in lines
                 if line.strip() and not line.lstrip().startswith("#")]
    if config.servers_dns:
        host, port = _host_port(config.servers_dns)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            logger.warning("cannot resolve %s: %s", config.servers_dns, exc)
            infos = []
        for family, _, _, _, address in infos:
            ip = address[0]
            urls.append(f"http://[{ip}]:{port}" if family == socket.AF_INET6
                        else f"http://{ip}:{port}")
    return list(dict.fromkeys(urls))


class Fleet:
    """HTTP calls to the replicas (thread-safe: one httpx client, used from a pool)."""

    def __init__(self, config: FollowConfig, admin_key: str):
        self.config = config
        self.client = httpx.Client(headers={"Authorization": f"Bearer {admin_key}"},
                                   timeout=config.request_timeout_s)

    def close(self) -> None:
        self.client.close()

    def pull(self, url: str, after: int, limit: int) -> Page:
        """Records committed after ``after`` (settled ones only; see ``settled_s``)."""
        params = {"after": after, "limit": limit, "settled_s": self.config.settled_s}
        data = self._json("GET", f"{url}/v1/trajectories", params=params)
        try:
            last = data.get("last_cursor")
            return Page(data["data"], int(data["next_cursor"]), str(data["store_id"]),
                        None if last is None else int(last))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReplicaError(f"{url}: unexpected pull answer ({exc})") from exc

    def ack(self, url: str, store_id: str, cursor: int) -> int:
        body = {"consumer": self.config.consumer, "cursor": cursor, "store_id": store_id}
        return int(self._json("POST", f"{url}/v1/trajectories/ack", json=body)["cursor"])

    def version(self, url: str) -> str:
        """The weight version ``url`` serves (``GET /v1/admin/weights``: the admin key, on
        the admin port when the servers have one)."""
        data = self._json("GET", f"{url}/v1/admin/weights")
        try:
            return str(data["version"])
        except (KeyError, TypeError) as exc:
            raise ReplicaError(f"{url}: unexpected /v1/admin/weights answer ({exc})") from exc

    def push(self, url: str, weights: Path, version: str) -> PushResult:
        """Upload ``weights`` (one safetensors file) as ``version``, retrying with backoff
        (``push_retries`` attempts, ``push_timeout_s`` each)."""
        start = time.monotonic()
        error = ""
        for attempt in range(1, self.config.push_retries + 1):
            try:
                with open(weights, "rb") as body:
                    r = self.client.post(f"{url}/v1/admin/weights/upload",
                                         params={"version": version}, content=body,
                                         headers={"content-type": "application/octet-stream"},
                                         timeout=self.config.push_timeout_s)
                if r.status_code == 200:
                    return PushResult(url, True, attempt, seconds=time.monotonic() - start)
                error = f"HTTP {r.status_code}: {_message(r)}"
                if r.status_code in (400, 403, 404, 413):  # retrying cannot help
                    break
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if attempt < self.config.push_retries:
                time.sleep(min(2.0 ** (attempt - 1), 10.0))
        return PushResult(url, False, attempt, error, time.monotonic() - start)

    def push_all(self, urls: list[str], weights: Path, version: str) -> list[PushResult]:
        """Push to every replica at once (a slow one does not hold the others back)."""
        if not urls:
            return []
        with ThreadPoolExecutor(max_workers=min(8, len(urls)),
                                thread_name_prefix="push") as pool:
            return list(pool.map(lambda u: self.push(u, weights, version), urls))

    def _json(self, method: str, url: str, **kwargs) -> dict:
        try:
            r = self.client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise ReplicaError(f"{url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            raise ReplicaError(f"{url}: HTTP {r.status_code}: {_message(r)}")
        try:
            return r.json()
        except ValueError as exc:
            raise ReplicaError(f"{url}: answer is not JSON") from exc


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:200]
