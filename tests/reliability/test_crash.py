"""A real ``e3rl serve`` killed with SIGKILL under load while a weight upload is half received,
then restarted on the same data and checkpoint directories.

Before the kill: the version applied last (an upload that completed) is served, and its greedy
output, all the while the second upload is under way. After it: no process of the server is
left, the store passes ``PRAGMA integrity_check`` and holds the trajectory of every request
whose response (or final stream chunk) the client had received, each with the version that
generated it; the dead upload's temporary file is removed at the restart. Swapped weights live
in memory only (README, "Weight hot-swap"), so the restarted server serves ``--model``'s
weights as version 0, with their greedy output, until the trainer pushes again; a push then
serves the pushed version's greedy output again. (SIGKILL under load alone, and SIGTERM, are
tests/server/test_store_durability.py's.)"""

from __future__ import annotations

import fcntl
import os
import signal
import time

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from e3rl.engine.model_factory import build_tiny_model
from e3rl.server.settings import STORE_FILE_NAME
from e3rl.server.upload import remove_stale_uploads

from tests.server.conftest import start_serve_process
from tests.server.test_store_durability import Load, integrity
from tests.server.test_upload import _open_upload, until

ADMIN = {"Authorization": "Bearer adm"}  # the key _open_upload sends
GREEDY = {"prompt": "The cat", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
NUM_BEFORE_UPLOAD, NUM_DURING_UPLOAD = 10, 10


def serve(model, data_dir, checkpoint_dir, log) -> tuple:
    proc, url = start_serve_process(
        ["--model", str(model), "--data-dir", str(data_dir), "--checkpoint-dir",
         str(checkpoint_dir), "--admin-key", "adm", "--num-kv-blocks", "256",
         "--num-threads", "1", "--no-access-log", "--log-level", "info"], log_path=log)
    return proc, url, int(url.rsplit(":", 1)[1])


def greedy(url: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json=GREEDY, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def weights(url: str) -> dict:
    return httpx.get(f"{url}/v1/admin/weights", headers=ADMIN, timeout=30).json()


def push(url: str, data: bytes, version: str) -> None:
    r = httpx.post(f"{url}/v1/admin/weights/upload", params={"version": version}, content=data,
                   headers={**ADMIN, "Content-Type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 200, r.text


def commit_timeouts(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    [value] = [s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "e3rl_trajectory_commit_timeouts_total"]
    return value


def partial_uploads(checkpoint_dir) -> list[str]:
    return [p.name for p in checkpoint_dir.iterdir() if p.name.startswith(".upload-")]


def test_sigkill_during_a_weight_upload_under_load(tiny_model, tmp_path):
    data_dir, checkpoint_dir, log = tmp_path / "data", tmp_path / "ckpts", tmp_path / "log"
    checkpoint_dir.mkdir()
    new = (build_tiny_model(tmp_path / "new", "qwen3", seed=2) / "model.safetensors").read_bytes()

    proc, url, port = serve(tiny_model, data_dir, checkpoint_dir, log)
    try:
        base_text = greedy(url)
        push(url, new, "1")
        new_text = greedy(url)
        assert new_text != base_text
        load = Load(url)
        load.wait_for(NUM_BEFORE_UPLOAD)
        upload = _open_upload(port, new, len(new) // 2, version="2")  # half a body, held
        until(lambda: weights(url)["updating"] and partial_uploads(checkpoint_dir))
        for name in partial_uploads(checkpoint_dir):  # old, but locked by a live upload
            os.utime(checkpoint_dir / name, (0, 0))
        assert remove_stale_uploads(checkpoint_dir) == 0
        load.wait_for(len(load.completed) + NUM_DURING_UPLOAD)
        assert weights(url)["version"] == "1" and greedy(url) == new_text
        # What README promises is for responses released after their commit (--store-wait-s
        # bounds the wait; a timeout is counted): none timed out here.
        assert commit_timeouts(url) == 0
        processes = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(True))]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        completed = load.join()
        upload.close()
    finally:
        proc.kill()
    # No process of the server survives it (an engine process exits with its parent).
    _, alive = psutil.wait_procs([psutil.Process(p) for p in processes if psutil.pid_exists(p)],
                                 timeout=30)
    assert not alive, alive
    assert partial_uploads(checkpoint_dir)  # the kill left the upload's file behind

    proc, url, _ = serve(tiny_model, data_dir, checkpoint_dir, log)  # the same directories
    try:
        assert integrity(data_dir / STORE_FILE_NAME) == "ok"
        records = {r["id"]: r for r in httpx.get(
            f"{url}/v1/trajectories", params={"limit": 10_000}, headers=ADMIN,
            timeout=30).json()["data"]}
        missing = set(completed) - records.keys()
        assert not missing, f"{len(missing)} of {len(completed)} completed request(s) lost"
        assert {records[i]["weight_version"] for i in completed} == {"1"}
        assert partial_uploads(checkpoint_dir) == []  # removed at the start
        assert "the temporary file of an upload whose server died" in log.read_text()
        assert weights(url) == {**weights(url), "version": "0", "updating": False}
        assert greedy(url) == base_text
        push(url, new, "1")  # what e3rl train follow does at its next poll
        assert weights(url)["version"] == "1" and greedy(url) == new_text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.kill()


def test_only_the_files_of_dead_uploads_are_removed(tmp_path):
    """A temporary upload file is removed only when no process holds its lock and it is not
    brand new; nothing else in the checkpoint directory is touched."""
    names = [".upload-live.safetensors.partial", ".upload-dead.safetensors.partial",
             ".upload-new.safetensors.partial", "model.safetensors", ".upload-x.json"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        if name != ".upload-new.safetensors.partial":
            os.utime(tmp_path / name, (time.time() - 60,) * 2)
    fd = os.open(tmp_path / names[0], os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert remove_stale_uploads(tmp_path) == 1
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - {names[1]})
