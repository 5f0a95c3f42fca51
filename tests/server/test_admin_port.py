"""``--admin-port``: a real ``e3rl serve`` process on two ports serves the admin and trajectory
routes (and ``/health``) on the admin port only, with the admin key, and everything else on
the main port only; a request on the wrong port is a 404 with an OpenAI error body. Both ports
share one engine and one store, and one SIGTERM stops both. Without the flag one port serves
everything, as before; an admin port equal to the main port is refused in one line."""

from __future__ import annotations

import signal
import socket
import subprocess
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient

from e3rl.server import cli, runner
from e3rl.server.app import create_app

from .conftest import make_settings, start_serve_process

ADMIN = {"Authorization": "Bearer adm"}
ADMIN_PATHS = ["/v1/trajectories", "/v1/trajectories/ack", "/v1/admin/weights",
               "/v1/admin/weights/upload"]
SHORT = {"prompt": "hi", "max_tokens": 3, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args(model, data_dir, *extra: str) -> list[str]:
    return ["--model", str(model), "--data-dir", str(data_dir), "--admin-key", "adm",
            "--num-kv-blocks", "64", "--num-threads", "1", "--no-access-log", *extra]


@dataclass
class Split:
    proc: subprocess.Popen
    main: str
    admin: str


@pytest.fixture(scope="module")
def split(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin-port")
    admin_port = free_port()
    proc, url = start_serve_process(serve_args(tiny_model, tmp / "data", "--admin-port",
                                               str(admin_port)), log_path=tmp / "server.log")
    yield Split(proc, url, f"http://127.0.0.1:{admin_port}")
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def request(url: str, path: str, headers: dict | None = None) -> httpx.Response:
    """The method each path takes; POST bodies are valid JSON (the route decides the rest)."""
    if path in ("/v1/trajectories", "/v1/models", "/health", "/ready", "/metrics"):
        return httpx.get(url + path, headers=headers, timeout=30)
    if path == "/v1/admin/weights/upload":
        return httpx.post(url + path, params={"version": "1"}, content=b"x" * 100_000,
                          headers={**(headers or {}),
                                   "Content-Type": "application/octet-stream"}, timeout=30)
    bodies = {"/v1/completions": SHORT, "/v1/trajectories/ack": {"consumer": "t", "cursor": 0},
              "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}],
                                       "max_tokens": 3},
              "/tokenize": {"prompt": "hi"}, "/v1/admin/weights": {"path": "x", "version": "1"},
              "/v1/feedback": {"id": "cmpl-none", "reward": 1.0}}
    return httpx.post(url + path, json=bodies[path], headers=headers, timeout=30)


def assert_wrong_port(r: httpx.Response, says: str) -> None:
    assert r.status_code == 404, (r.request.url, r.text)
    assert r.json() == {"error": {"message": r.json()["error"]["message"],
                                  "type": "not_found_error", "param": None,
                                  "code": "wrong_port"}}
    assert says in r.json()["error"]["message"]


def test_admin_routes_only_on_the_admin_port_with_the_key(split):
    r = httpx.get(f"{split.admin}/v1/trajectories", headers=ADMIN, timeout=30)
    assert r.status_code == 200 and r.json()["object"] == "list"
    store_id = r.json()["store_id"]
    r = httpx.post(f"{split.admin}/v1/trajectories/ack", headers=ADMIN, timeout=30,
                   json={"consumer": "t", "cursor": 0, "store_id": store_id})
    assert r.status_code == 200 and r.json()["cursor"] == 0
    # Reached (the key is good), refused by the route itself: no --checkpoint-dir.
    for path in ("/v1/admin/weights", "/v1/admin/weights/upload"):
        assert request(split.admin, path, ADMIN).status_code == 403, path
    for path in ADMIN_PATHS:
        r = request(split.admin, path)  # no key
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key", path
        # The main port does not serve them, key or not (the upload's body is read first).
        for headers in (ADMIN, None):
            assert_wrong_port(request(split.main, path, headers), "admin port")
    assert_wrong_port(httpx.get(f"{split.main}/v1/trajectories/", headers=ADMIN, timeout=30),
                      "admin port")


def test_api_routes_only_on_the_main_port(split):
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
                 "/ready", "/metrics", "/health"):
        assert request(split.main, path).status_code == 200, path
    assert "e3rl_draining" in httpx.get(f"{split.main}/metrics", timeout=30).text
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize",
                 "/v1/feedback", "/ready", "/metrics", "/docs", "/nowhere"):
        assert_wrong_port(request(split.admin, path) if path not in ("/docs", "/nowhere")
                          else httpx.get(split.admin + path, timeout=30), "admin port")
    r = httpx.get(f"{split.admin}/health", timeout=30)  # a probe can check the admin port
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_one_store_behind_both_ports(split):
    r = httpx.post(f"{split.main}/v1/completions", json=SHORT, timeout=30)
    assert r.status_code == 200
    trajectory_id = f"{r.json()['id']}-0:0"
    r = httpx.post(f"{split.main}/v1/feedback", json={"id": r.json()["id"], "reward": 0.5},
                   timeout=30)
    assert r.status_code == 200
    r = httpx.get(f"{split.admin}/v1/trajectories", params={"limit": 10_000}, headers=ADMIN,
                  timeout=30)
    records = {rec["id"]: rec for rec in r.json()["data"]}
    assert records[trajectory_id]["feedback"]["reward"] == 0.5


def test_one_sigterm_stops_both_ports(split):
    split.proc.send_signal(signal.SIGTERM)
    assert split.proc.wait(30) == 0
    for url in (split.main, split.admin):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)


def test_without_admin_port_one_port_serves_everything(tiny_model, tmp_path):
    proc, url = start_serve_process(serve_args(tiny_model, tmp_path / "data"),
                                    log_path=tmp_path / "server.log")
    try:
        r = httpx.post(f"{url}/v1/completions", json=SHORT, timeout=30)
        assert r.status_code == 200
        trajectory_id = f"{r.json()['id']}-0:0"
        r = httpx.get(f"{url}/v1/trajectories", params={"limit": 10_000}, headers=ADMIN,
                      timeout=30)
        assert r.status_code == 200 and trajectory_id in [rec["id"] for rec in r.json()["data"]]
        assert request(url, "/v1/trajectories").status_code == 401
        assert request(url, "/v1/admin/weights", ADMIN).status_code == 403
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


# -- in process: settings and the split's rules --------------------------------------------
@pytest.fixture()
def captured(monkeypatch):
    """Run ``e3rl serve`` without serving: the settings it would serve with."""
    calls = []
    monkeypatch.setattr(runner, "run_app", lambda app, settings: calls.append(settings))
    return calls


def test_admin_port_from_flag_and_env(monkeypatch, captured, tiny_model):
    assert cli.main(["serve", "--model", str(tiny_model), "--admin-port", "9101"]) == 0
    monkeypatch.setenv("E3RL_ADMIN_PORT", "9102")
    assert cli.main(["serve", "--model", str(tiny_model)]) == 0
    monkeypatch.delenv("E3RL_ADMIN_PORT")
    assert cli.main(["serve", "--model", str(tiny_model)]) == 0
    assert [s.admin_port for s in captured] == [9101, 9102, None]


@pytest.mark.parametrize("args,env", [(["--port", "9100", "--admin-port", "9100"], {}),
                                      ([], {"E3RL_PORT": "9100", "E3RL_ADMIN_PORT": "9100"}),
                                      (["--admin-port", "8000"], {})])  # the default port
def test_admin_port_equal_to_port_is_refused_in_one_line(monkeypatch, captured, capsys,
                                                         tiny_model, args, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--model", str(tiny_model), *args])
    assert info.value.code == 2 and not captured
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("e3rl: error: --admin-port must differ from --port (both are ")


def test_split_rules_in_process(engine, tiny_model):
    """The middleware alone (the port a request came on is the scope's ``server``): exact
    admin paths, a trailing slash, unknown paths, and the 404 counted in the metrics."""
    app = create_app(make_settings(tiny_model, admin_port=9001, admin_key="adm"),
                     engine=engine)
    with TestClient(app, base_url="http://testserver:9001") as admin, \
            TestClient(app, base_url="http://testserver:8000") as main:
        assert admin.get("/v1/trajectories/", headers=ADMIN).status_code == 200
        assert admin.get("/health").status_code == 200
        assert_wrong_port(admin.get("/v1/trajectoriesX", headers=ADMIN), "admin port")
        assert_wrong_port(main.get("/v1/trajectories", headers=ADMIN), "admin port")
        assert_wrong_port(main.post("/v1/admin/weights/", json={}), "admin port")
        assert main.get("/v1/models").status_code == 200
        metrics = main.get("/metrics").text
    assert 'e3rl_request_errors_total{model="tiny",status="404"} 3.0' in metrics
