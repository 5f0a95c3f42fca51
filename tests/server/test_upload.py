"""``POST /v1/admin/weights/upload`` on a live server: a checkpoint sent in the body (with a
length, or chunked) is swapped in and greedy output becomes the uploaded weights'; a bad file,
a file over the cap, a stalled or abandoned upload and bad credentials are refused with a
clear error while the old weights keep serving; and no temporary file is ever left in the
checkpoint directory."""

from __future__ import annotations

import socket
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save

from e3rl.engine.model_factory import build_tiny_model
from e3rl.server import upload as upload_module
from e3rl.server.app import create_app

from tests.conftest import hf_greedy

from .conftest import LiveServer, make_settings

ADMIN = {"Authorization": "Bearer adm"}
GREEDY = {"prompt": "The cat", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
TENSOR = "model.layers.0.mlp.up_proj.weight"
URL = "/v1/admin/weights/upload"
# --max-request-bytes of the servers here: far below a checkpoint, so an accepted upload
# shows that the upload route is exempt from it.
MAX_REQUEST_BYTES = 1024


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model):
    """The served model's file, another model's ("new": same shapes, other seed) and the
    variants to refuse, as bytes."""
    new = build_tiny_model(tmp_path_factory.mktemp("upload-src") / "new", "qwen3", seed=2)
    data = (new / "model.safetensors").read_bytes()
    tensors = load_file(str(new / "model.safetensors"))

    def edited(edit) -> bytes:
        copy = dict(tensors)
        edit(copy)
        return save(copy)

    return {
        "new": data, "new_dir": new,
        "original": (tiny_model / "model.safetensors").read_bytes(),
        "truncated": data[: len(data) // 2],
        "garbled": b"\x00\x01not a safetensors file" * 64,
        "empty": b"",
        "shape": edited(lambda t: t.update({TENSOR: t[TENSOR][:-1].clone()})),
        "dtype": edited(lambda t: t.update({TENSOR: t[TENSOR].double()})),
        "missing": edited(lambda t: t.pop(TENSOR)),
        "extra": edited(lambda t: t.update(extra=torch.zeros(2))),
        "nan": edited(lambda t: t.update({TENSOR: torch.full_like(t[TENSOR], float("nan"))})),
    }


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("upload-ckpts")


@pytest.fixture(scope="module")
def server(tiny_model, root):
    """A live server that owns its engine (the swaps here touch no other test's engine)."""
    live = LiveServer(create_app(make_settings(tiny_model, admin_key="adm",
                                               checkpoint_dir=str(root),
                                               max_request_bytes=MAX_REQUEST_BYTES)))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def capped(tiny_model, engine, root):
    """A live server on the shared session engine with a 4 KiB upload cap (nothing it is sent
    is accepted, so the shared engine's weights never change)."""
    live = LiveServer(create_app(make_settings(tiny_model, admin_key="adm",
                                               checkpoint_dir=str(root), max_upload_bytes=4096),
                                 engine=engine))
    yield live
    live.stop()


def post(url: str, content, version: str | None = "2", headers=ADMIN) -> httpx.Response:
    params = {} if version is None else {"version": version}
    return httpx.post(f"{url}{URL}", params=params, content=content, timeout=60,
                      headers={"Content-Type": "application/octet-stream", **headers})


def chunks(data: bytes, size: int = 4096):
    """A generator body: httpx sends it chunked (no Content-Length)."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def greedy_text(url: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json=GREEDY, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def served_version(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["weight_version"]


def leftovers(root) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def record_of(url: str, response_id: str) -> dict:
    records = httpx.get(f"{url}/v1/trajectories", params={"limit": 10_000}, headers=ADMIN,
                        timeout=10).json()["data"]
    [record] = [r for r in records if r["id"] == f"{response_id}-0:0"]
    return record


def until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_default_cap_is_the_models_parameter_bytes_plus_slack(server, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    num_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert server.app.state.max_upload_bytes == num_bytes + 16 * 1024 * 1024


@pytest.mark.parametrize("chunked", [True, False])
def test_an_upload_swaps_and_uploading_the_original_back_restores(server, files, root,
                                                                  chunked, caplog):
    before = greedy_text(server.url)
    assert len(files["new"]) > MAX_REQUEST_BYTES  # exempt from --max-request-bytes
    with caplog.at_level("INFO", logger="e3rl.server.routes.upload"):
        r = post(server.url, chunks(files["new"]) if chunked else files["new"], version="2")
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["object"] == "weight_update" and answer["source"] == "upload"
    assert answer["version"] == "2" and answer["previous_version"] == "0"
    assert answer["path"] is None and answer["num_bytes"] == len(files["new"])
    assert answer["num_tensors"] == len(load_file(str(files["new_dir"] / "model.safetensors")))
    assert all(answer[k] >= 0 for k in ("receive_s", "load_s", "swap_s"))
    assert any("from an upload" in m and f"{len(files['new'])} bytes" in m
               for m in caplog.messages)
    assert served_version(server.url) == "2"

    # Greedy output is now the uploaded weights' (Hugging Face generate on them).
    r = httpx.post(f"{server.url}/v1/completions", json=GREEDY, timeout=60)
    assert r.json()["system_fingerprint"] == "e3rl-w2"
    record = record_of(server.url, r.json()["id"])
    [reference] = hf_greedy(files["new_dir"], [record["prompt_token_ids"]], GREEDY["max_tokens"])
    assert record["output_token_ids"] == reference
    assert r.json()["choices"][0]["text"] != before

    r = post(server.url, files["original"], version="0")
    assert r.status_code == 200 and r.json()["previous_version"] == "2", r.text
    assert served_version(server.url) == "0" and greedy_text(server.url) == before
    assert leftovers(root) == []


@pytest.mark.parametrize("name, says", [
    ("truncated", "not a valid safetensors file"),
    ("garbled", "not a valid safetensors file"),
    ("empty", "the body is empty"),
    ("shape", f"'{TENSOR}' has shape (127, 64)"),
    ("dtype", f"'{TENSOR}' has dtype torch.float64"),
    ("missing", f"missing 1 tensor(s), e.g. '{TENSOR}'"),
    ("extra", "1 unexpected tensor(s), e.g. 'extra'"),
    ("nan", f"'{TENSOR}' holds NaN or infinite values"),
])
@pytest.mark.parametrize("chunked", [False, True])
def test_bad_files_are_refused_and_the_old_weights_keep_serving(server, files, root, name,
                                                                says, chunked):
    before = greedy_text(server.url)
    data = files[name]
    r = post(server.url, chunks(data) if chunked else data)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_checkpoint" and error["type"] == "invalid_request_error"
    assert says in error["message"] and "still serving version 0" in error["message"]
    assert served_version(server.url) == "0" and greedy_text(server.url) == before
    assert leftovers(root) == []


@pytest.mark.parametrize("chunked", [False, True])
def test_over_the_cap_is_413_and_nothing_changes(capped, files, root, chunked):
    before = greedy_text(capped.url)
    data = files["new"] * 40  # ~10 MiB: refused early, the rest drained
    r = post(capped.url, chunks(data, 65536) if chunked else data)
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "request_too_large" and "limit 4096 bytes" in error["message"]
    assert served_version(capped.url) == "0" and greedy_text(capped.url) == before
    assert leftovers(root) == []


def test_other_routes_keep_the_request_size_limit(server):
    big = {**GREEDY, "prompt": "x" * (2 * MAX_REQUEST_BYTES)}
    r = httpx.post(f"{server.url}/v1/completions", json=big, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{server.url}/v1/admin/weights", json={"path": "x" * 2048, "version": "9"},
                   headers=ADMIN, timeout=60)
    assert r.status_code == 413
    # Only the exact upload path is exempt.
    r = httpx.post(f"{server.url}{URL}/", content=b"x" * 4096, headers=ADMIN, timeout=60)
    assert r.status_code == 413


@pytest.mark.parametrize("headers, status, code", [
    ({}, 401, "invalid_admin_key"),
    ({"Authorization": "Bearer wrong"}, 401, "invalid_admin_key")])
def test_wrong_admin_key_is_refused(server, files, root, headers, status, code):
    r = post(server.url, files["new"], headers=headers)
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert served_version(server.url) == "0" and leftovers(root) == []


@pytest.mark.parametrize("params, content_type, status, param, says", [
    ({}, "application/octet-stream", 400, "version", "version is required"),
    ({"version": ""}, "application/octet-stream", 400, "version", "version is required"),
    ({"version": "v" * 129}, "application/octet-stream", 400, "version", "at most 128"),
    ({"version": "2"}, "multipart/form-data; boundary=x", 415, None, "application/octet"),
])
def test_bad_requests_name_the_problem(server, files, root, params, content_type, status,
                                       param, says):
    r = httpx.post(f"{server.url}{URL}", params=params, content=files["new"], timeout=60,
                   headers={**ADMIN, "Content-Type": content_type})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and says in r.json()["error"]["message"]
    assert served_version(server.url) == "0" and leftovers(root) == []


def test_admin_routes_off_or_no_checkpoint_dir(tiny_model, engine, files, root):
    off = create_app(make_settings(tiny_model, checkpoint_dir=str(root)), engine=engine)
    no_dir = create_app(make_settings(tiny_model, admin_key="adm"), engine=engine)
    for app, status, code in [(off, 404, "admin_disabled"),
                              (no_dir, 403, "weight_updates_disabled")]:
        with TestClient(app) as client:
            r = client.post(URL, params={"version": "2"}, content=files["new"], headers=ADMIN)
        assert r.status_code == status and r.json()["error"]["code"] == code
    assert engine.latest_stats.weight_version == "0" and leftovers(root) == []


def _open_upload(port: int, data: bytes, num_sent: int, version: str = "9") -> socket.socket:
    """An upload announcing ``len(data)`` bytes of which only ``num_sent`` are sent."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST {URL}?version={version} HTTP/1.1\r\nHost: test\r\n"
            f"Authorization: Bearer adm\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    sock.sendall(head + data[:num_sent])
    return sock


def test_a_second_update_during_an_upload_is_409_and_a_disconnect_cleans_up(server, files,
                                                                           root, caplog):
    """An upload that has sent half its body holds the update lock: another upload and a path
    swap get 409. When its client disconnects, its temporary file is removed and the lock
    freed; the weights never changed."""
    before = greedy_text(server.url)
    caplog.set_level("WARNING", logger="e3rl.server.routes.upload")
    sock = _open_upload(server.port, files["new"], len(files["new"]) // 2)
    try:
        until(lambda: any(n.startswith(".upload-") for n in leftovers(root)))
        r = post(server.url, files["new"], version="3")
        assert r.status_code == 409 and r.json()["error"]["code"] == "weight_update_in_progress"
        r = httpx.post(f"{server.url}/v1/admin/weights", json={"path": ".", "version": "3"},
                       headers=ADMIN, timeout=60)
        assert r.status_code == 409
    finally:
        sock.close()
    until(lambda: leftovers(root) == [] and not server.app.state.weights_lock.locked())
    assert any("abandoned: the client disconnected" in m for m in caplog.messages)
    assert served_version(server.url) == "0" and greedy_text(server.url) == before
    r = post(server.url, files["missing"])  # the lock is free: refused on its merits
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_checkpoint"


def test_a_stalled_upload_is_408(server, files, root, monkeypatch):
    monkeypatch.setattr(upload_module, "STALL_TIMEOUT_S", 0.5)
    sock = _open_upload(server.port, files["new"], 1000)
    try:
        answer = b""
        while piece := sock.recv(65536):  # the server closes after the 408
            answer += piece
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"upload_timeout"' in answer
    until(lambda: leftovers(root) == [] and not server.app.state.weights_lock.locked())
    assert served_version(server.url) == "0"


def test_an_internal_error_leaves_no_file_and_frees_the_lock(server, files, root,
                                                            monkeypatch):
    async def broken(path, version):
        assert path.exists() and path.stat().st_size == len(files["new"])
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(server.app.state.engine, "update_weights", broken)
    r = post(server.url, files["new"])
    assert r.status_code == 500 and "disk on fire" not in r.text
    assert leftovers(root) == [] and not server.app.state.weights_lock.locked()
    assert served_version(server.url) == "0"


def test_max_upload_bytes_flag_and_env(monkeypatch, tiny_model):
    from e3rl.server import cli, runner

    apps = []
    monkeypatch.setattr(runner, "run_app", lambda app, settings: apps.append(app))
    assert cli.main(["serve", "--model", str(tiny_model), "--max-upload-bytes", "5000"]) == 0
    monkeypatch.setenv("E3RL_MAX_UPLOAD_BYTES", "6000")
    assert cli.main(["serve", "--model", str(tiny_model)]) == 0
    assert [a.state.settings.max_upload_bytes for a in apps] == [5000, 6000]


def _expect_continue(port: int, data: bytes, key: str = "adm", version: str = "4") -> tuple:
    """An upload that announces ``len(data)`` bytes with ``Expect: 100-continue`` and sends
    none yet: (socket, the server's first answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall((f"POST {URL}?version={version} HTTP/1.1\r\nHost: test\r\n"
                  f"Authorization: Bearer {key}\r\nContent-Type: application/octet-stream\r\n"
                  f"Content-Length: {len(data)}\r\nExpect: 100-continue\r\n\r\n").encode())
    return sock, sock.recv(65536)


def test_expect_100_continue(server, files, root):
    """curl sends large bodies after ``Expect: 100-continue``: a refusal comes at once,
    without asking for the body; an accepted upload gets its 100 Continue and swaps."""
    t0 = time.monotonic()
    sock, answer = _expect_continue(server.port, files["new"], key="wrong")
    sock.close()
    assert answer.startswith(b"HTTP/1.1 401") and time.monotonic() - t0 < 2, answer

    sock, answer = _expect_continue(server.port, files["new"])
    try:
        assert answer.startswith(b"HTTP/1.1 100"), answer
        sock.sendall(files["new"])
        answer = b""
        while b'"weight_update"' not in answer:
            piece = sock.recv(65536)
            assert piece, answer
            answer += piece
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert served_version(server.url) == "4"
    assert post(server.url, files["original"], version="0").status_code == 200
    assert served_version(server.url) == "0" and leftovers(root) == []
