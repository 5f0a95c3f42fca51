"""Security: every route the app has (walked from its route table, so that a new route cannot
escape) needs the API key or the admin key, on its port; keys are compared in constant time;
every cap is a 400 or 413 in OpenAI's format; checkpoint paths stay inside --checkpoint-dir;
nothing unpickles; a live ``e3rl serve`` at DEBUG never logs prompt text; and ``e3rl serve``
binds to the loopback interface unless told otherwise."""

from __future__ import annotations

import ast
import hmac
import os
import re
import shutil
import signal
import socket
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from e3rl.server import auth, cli, runner
from e3rl.server.app import create_app
from e3rl.server.protocol import MAX_PROMPTS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS
from e3rl.server.routes import admin, trajectories, upload
from e3rl.server.settings import Settings

from tests.server.conftest import make_settings, start_serve_process
from tests.server.test_errors import _check_error

REPO = Path(__file__).resolve().parents[2]
API_KEY, ADMIN_KEY = "api-key-1", "admin-key-2"
API, ADMIN = {"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}"}
WRONG = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
         {"Authorization": f"Basic {API_KEY}"}]
ADMIN_PORT = 9001
# Open without a key, by design and as the README says: the probes, and FastAPI's pages that
# describe the API (its public schema; no data, no compute).
OPEN = {"/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
ADMIN_PATHS = {route.path for module in (trajectories, admin, upload)
               for route in module.router.routes}


def routes(app) -> list[tuple[str, str]]:
    """Every (method, path) the app serves: its route table walked through included
    routers (HEAD, implied by GET, left out)."""
    found = []

    def walk(items, prefix: str) -> None:
        for route in items:
            inner = getattr(route, "original_router", None)
            if inner is not None:  # an included router
                walk(inner.routes, prefix + route.include_context.prefix)
            elif getattr(route, "methods", None):
                path = re.sub(r"\{(\w+):\w+\}", r"{\1}", prefix + route.path)  # {id:path}
                found.extend((m, path) for m in sorted(route.methods) if m != "HEAD")
            else:
                raise AssertionError(f"a route of unknown kind: {route!r}")

    walk(app.routes, "")
    return found


def call(client: TestClient, method: str, path: str, headers: dict) -> httpx.Response:
    """``method path`` with a body each route could take (a key check must come first)."""
    path = re.sub(r"\{[^}]+\}", "tiny", path)
    if path == upload.UPLOAD_PATH:
        return client.request(method, path, params={"version": "1"}, content=b"x" * 1000,
                              headers={**headers, "Content-Type": "application/octet-stream"})
    if method == "GET":
        return client.get(path, headers=headers)
    return client.request(method, path, json={}, headers=headers)


@pytest.fixture(scope="module")
def keyed(tiny_model, engine, tmp_path_factory):
    """Two apps on the shared engine with both keys and /metrics protected: one port, and
    the admin routes on an admin port of their own."""
    checkpoints = tmp_path_factory.mktemp("keyed-ckpts")
    apps = {}
    for admin_port in (None, ADMIN_PORT):
        apps[admin_port] = create_app(make_settings(
            tiny_model, api_key=API_KEY, admin_key=ADMIN_KEY, metrics_require_auth=True,
            admin_port=admin_port, checkpoint_dir=str(checkpoints)), engine=engine)
    return apps


def test_the_route_walk_finds_every_documented_route(keyed):
    app = keyed[None]
    walked = {(m, p) for m, p in routes(app)}
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert documented <= walked and {p for _, p in walked - documented} <= OPEN
    assert ADMIN_PATHS and ADMIN_PATHS < {p for _, p in walked}


def test_every_route_needs_its_key(keyed):
    """One port: each API route refuses no key, a wrong one, a malformed header and the
    admin key; each admin route refuses all those and the API key; the right key is let
    through (not a 401, not a 404: the route exists and was reached)."""
    with TestClient(keyed[None]) as client:
        for method, path in routes(keyed[None]):
            if path in OPEN:
                assert call(client, method, path, {}).status_code == 200, path
                continue
            is_admin = path in ADMIN_PATHS
            right, other = (ADMIN, API) if is_admin else (API, ADMIN)
            code = "invalid_admin_key" if is_admin else "invalid_api_key"
            for headers in [*WRONG, other]:
                r = call(client, method, path, headers)
                _check_error(r, 401, None)
                assert r.json()["error"]["code"] == code, (method, path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
            assert call(client, method, path, right).status_code not in (401, 404), path


def test_the_admin_port_needs_the_admin_key(keyed):
    """With --admin-port the admin routes are on it only (404 on the main port, whatever the
    key), and there they still need the admin key: the API key does not open them."""
    app = keyed[ADMIN_PORT]
    with TestClient(app, base_url=f"http://testserver:{ADMIN_PORT}") as on_admin, \
            TestClient(app, base_url="http://testserver:8000") as on_main:
        for method, path in routes(app):
            if path not in ADMIN_PATHS:
                continue
            for headers in [*WRONG, API]:
                r = call(on_admin, method, path, headers)
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["code"] == "invalid_admin_key"
            assert call(on_admin, method, path, ADMIN).status_code not in (401, 404), path
            for headers in ({}, ADMIN, API):
                r = call(on_main, method, path, headers)
                assert r.status_code == 404 and r.json()["error"]["code"] == "wrong_port"


def test_feedback_needs_the_api_key(keyed):
    with TestClient(keyed[None]) as client:
        body = {"id": "cmpl-x", "index": 0, "reward": 1.0}
        for headers in [*WRONG, ADMIN]:
            r = client.post("/v1/feedback", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = client.post("/v1/feedback", json=body, headers=API)
        assert r.status_code == 404 and r.json()["error"]["code"] == "trajectory_not_found"


# -- constant-time key comparison ----------------------------------------------------------
# In auth.py anything that looks like a key or a token; elsewhere in the server, the names
# that hold the configured keys (a dict's "key" is not a secret).
AUTH_NAMES = re.compile(r"key|token|secret|authorization|bearer", re.IGNORECASE)
SECRET_NAMES = re.compile(r"api_key|admin_key|get_secret_value|secret|password", re.IGNORECASE)


def test_no_key_is_compared_with_equality():
    """No ``==``/``!=``/``in`` of a key anywhere in the server (``hmac.compare_digest``
    only). A string constant alone, e.g. the scheme "bearer", is not a secret."""
    offences = []
    for path in sorted((REPO / "server").rglob("*.py")):
        names = AUTH_NAMES if path.name == "auth.py" else SECRET_NAMES
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            if not any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                       for op in node.ops):
                continue
            operands = [node.left, *node.comparators]
            if any(not isinstance(o, ast.Constant) and names.search(ast.unparse(o))
                   for o in operands):
                offences.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not offences, offences


def test_keys_are_checked_with_compare_digest(keyed, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    with TestClient(keyed[None]) as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer guess"}
                          ).status_code == 401
        assert client.get("/v1/admin/weights", headers={"Authorization": "Bearer guess2"}
                          ).status_code == 401
        assert client.get("/v1/models", headers=API).status_code == 200
    assert (b"guess", API_KEY.encode()) in calls
    assert (b"guess2", ADMIN_KEY.encode()) in calls
    assert (API_KEY.encode(), API_KEY.encode()) in calls


# -- caps ------------------------------------------------------------------------------------
MAX_REQUEST_BYTES, MAX_N, MAX_UPLOAD_BYTES = 64 * 1024, 4, 4096
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
SHORT = {"prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def capped(tiny_model, engine, tmp_path_factory):
    settings = make_settings(tiny_model, admin_key=ADMIN_KEY, max_request_bytes=MAX_REQUEST_BYTES,
                             max_n=MAX_N, max_upload_bytes=MAX_UPLOAD_BYTES,
                             checkpoint_dir=str(tmp_path_factory.mktemp("capped-ckpts")))
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def _caps(context: int) -> list[tuple]:
    """(name, path, body, status, param); the body is JSON, or raw bytes for an upload."""
    return [
        ("body over --max-request-bytes", "/v1/completions",
         {"prompt": "a" * MAX_REQUEST_BYTES}, 413, None),
        ("feedback body over --max-request-bytes", "/v1/feedback",
         {"id": "x", "reference": "a" * MAX_REQUEST_BYTES}, 413, None),
        ("prompt over the context", "/v1/completions",
         {**SHORT, "prompt": [5] * (context + 1)}, 400, "prompt"),
        ("chat prompt over the context", "/v1/chat/completions",
         {**CHAT, "messages": [{"role": "user", "content": "a " * context}]}, 400, "prompt"),
        ("prompts over MAX_PROMPTS", "/v1/completions",
         {**SHORT, "prompt": ["a"] * (MAX_PROMPTS + 1)}, 400, "prompt"),
        ("stop strings over MAX_STOP_STRINGS", "/v1/chat/completions",
         {**CHAT, "stop": ["x"] * (MAX_STOP_STRINGS + 1)}, 400, "stop"),
        ("stop token ids over MAX_STOP_TOKEN_IDS", "/v1/completions",
         {**SHORT, "stop_token_ids": [1] * (MAX_STOP_TOKEN_IDS + 1)}, 400, "stop_token_ids"),
        ("n over --max-n", "/v1/completions", {**SHORT, "n": MAX_N + 1}, 400, "n"),
        ("chat n over --max-n", "/v1/chat/completions", {**CHAT, "n": MAX_N + 1}, 400, "n"),
        ("best_of over --max-n", "/v1/completions", {**SHORT, "best_of": MAX_N + 1}, 400,
         "best_of"),
        ("max_tokens over the context", "/v1/completions", {**SHORT, "max_tokens": context},
         400, "max_tokens"),
        ("max_tokens huge", "/v1/completions", {**SHORT, "max_tokens": 2 ** 63}, 400,
         "max_tokens"),
        ("chat max_tokens over the context", "/v1/chat/completions",
         {**CHAT, "max_tokens": context}, 400, "max_tokens"),
        ("chat max_completion_tokens over the context", "/v1/chat/completions",
         {**CHAT, "max_completion_tokens": context}, 400, "max_tokens"),
        ("upload over --max-upload-bytes", upload.UPLOAD_PATH, b"x" * (MAX_UPLOAD_BYTES + 1),
         413, None),
    ]


CAP_NAMES = [c[0] for c in _caps(1)]


@pytest.mark.parametrize("name", CAP_NAMES)
def test_caps_are_openai_errors(capped, engine, name):
    [(_, path, body, status, param)] = [c for c in _caps(engine.max_model_len) if c[0] == name]
    if isinstance(body, bytes):
        r = capped.post(path, params={"version": "1"}, content=body,
                        headers={**ADMIN, "Content-Type": "application/octet-stream"})
    else:
        r = capped.post(path, json=body)
    _check_error(r, status, param)
    if status == 413:
        assert r.json()["error"]["code"] == "request_too_large"
    assert capped.post("/v1/completions", json=SHORT).status_code == 200  # serves on


# -- checkpoint paths --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def confined(tiny_model, engine, tmp_path_factory):
    """--checkpoint-dir ``root`` holding every way out of it. The checkpoint they lead to
    is a copy of the served weights, so that even an escape would leave the shared engine's
    outputs alone (its version would show it)."""
    base = tmp_path_factory.mktemp("confined")
    root, outside = base / "root", base / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(tiny_model / "model.safetensors", outside / "model.safetensors")
    os.symlink(outside, root / "dir-link")
    (root / "file-link").mkdir()
    os.symlink(outside / "model.safetensors", root / "file-link" / "model.safetensors")
    (root / "nested").mkdir()
    os.symlink(base, root / "nested" / "up")
    (root / "fifo").mkdir()
    os.mkfifo(root / "fifo" / "model.safetensors")
    settings = make_settings(tiny_model, admin_key=ADMIN_KEY, checkpoint_dir=str(root))
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client, root, outside


ESCAPES = [("dotdot", "../outside", "must not contain '..'"),
           ("absolute", "OUTSIDE", "resolves outside the checkpoint directory"),
           ("symlinked directory", "dir-link", "resolves outside the checkpoint directory"),
           ("symlink in the path", "nested/up/outside", "resolves outside the checkpoint"),
           ("symlinked file", "file-link", "model.safetensors resolves outside"),
           ("fifo", "fifo", "model.safetensors is not a regular file"),
           ("NUL byte", "a\x00b", "cannot be resolved"),
           ("name too long", "x" * 5000, "cannot be resolved")]


@pytest.mark.parametrize("path, says", [e[1:] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_checkpoint_paths_stay_inside_the_checkpoint_dir(confined, engine, path, says):
    client, _, outside = confined
    if path == "OUTSIDE":
        path = str(outside)
    r = client.post("/v1/admin/weights", json={"path": path, "version": "9"}, headers=ADMIN)
    _check_error(r, 400, None)
    assert r.json()["error"]["code"] == "invalid_checkpoint" and r.json()["error"]["param"] \
        == "path"
    assert says in r.json()["error"]["message"], r.json()
    assert engine.latest_stats.weight_version == "0"
    assert not client.app.state.weights_lock.locked()


# -- no pickle ---------------------------------------------------------------------------------
UNPICKLING = ["torch.load(", "pickle.load", "pickle.loads", "trust_remote_code=True",
              "weights_only=False"]


def test_nothing_unpickles():
    """No call that can run a pickle (or remote code) in any shipped Python file. Nothing is
    allowed: checkpoints, optimizer state and RNG state are all safetensors."""
    files = [p for folder in ("engine", "server", "trainer", "benchmarks", "examples")
             for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 50
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}" for p in files
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if any(pattern in line.replace(" ", "") for pattern in UNPICKLING)]
    assert not found, found


# -- logs ------------------------------------------------------------------------------------
MARKER = "zqxj-secret-prompt-7731"


def test_a_live_server_at_debug_never_logs_prompt_text(tiny_model, tmp_path):
    """Every way a prompt (or a reference answer) reaches the server, successful or refused,
    through a real ``e3rl serve`` logging at DEBUG with its access log on: the marker is in
    none of its output. (There is no option to log prompts.) The admin port is checked on the
    same process: it refuses the API key, and the main port does not serve the admin routes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        admin_port = s.getsockname()[1]
    log = tmp_path / "server.log"
    proc, url = start_serve_process(
        ["--model", str(tiny_model), "--data-dir", str(tmp_path / "data"), "--api-key", API_KEY,
         "--admin-key", ADMIN_KEY, "--admin-port", str(admin_port), "--num-threads", "1",
         "--num-kv-blocks", "64", "--log-level", "debug"], log_path=log)
    admin_url = f"http://127.0.0.1:{admin_port}"
    try:
        with httpx.Client(base_url=url, headers=API, timeout=60) as c:
            ok = c.post("/v1/completions", json={"prompt": MARKER, "max_tokens": 4})
            assert ok.status_code == 200
            c.post("/v1/completions", json={"prompt": [MARKER, MARKER + "2"], "max_tokens": 2,
                                            "stream": True, "temperature": 1.0})
            c.post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                              "content": MARKER}],
                                                 "max_tokens": 2, "logprobs": True})
            c.post("/tokenize", json={"prompt": MARKER})
            c.post("/v1/feedback", json={"id": ok.json()["id"], "reference": MARKER})
            for refused in ({"prompt": MARKER * 400, "max_tokens": 2},  # over the context
                            {"prompt": MARKER, "bogus": MARKER}, {"prompt": MARKER, "n": 0},
                            {"prompt": MARKER, "model": MARKER}):
                assert c.post("/v1/completions", json=refused).status_code in (400, 404)
            assert c.post("/v1/completions", content=f'{{"prompt": "{MARKER}"'
                          ).status_code == 400
        records = httpx.get(f"{admin_url}/v1/trajectories", headers=ADMIN, timeout=30)
        assert MARKER in records.text  # stored, as it must be: the store is not the log
        assert httpx.get(f"{admin_url}/v1/trajectories", headers=API,
                         timeout=30).status_code == 401
        assert httpx.get(f"{url}/v1/trajectories", headers=ADMIN,
                         timeout=30).status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    text = log.read_text()
    assert " DEBUG " in text and "POST /v1/completions" in text  # DEBUG and access lines
    assert MARKER not in text, [line for line in text.splitlines() if MARKER in line][:5]


# -- bind address ------------------------------------------------------------------------------
def test_serve_binds_to_loopback_by_default(monkeypatch, tiny_model):
    monkeypatch.delenv("E3RL_HOST", raising=False)
    assert Settings.model_fields["host"].default == "127.0.0.1"
    served = []
    monkeypatch.setattr(runner, "run_app", lambda app, settings: served.append(settings))
    assert cli.main(["serve", "--model", str(tiny_model)]) == 0
    assert served[0].host == "127.0.0.1"
    assert cli.main(["serve", "--model", str(tiny_model), "--host", "0.0.0.0"]) == 0
    assert served[1].host == "0.0.0.0"  # only when asked
