"""SIGTERM drains a real ``e3rl serve`` process: ``/ready`` turns 503 at once while the
running requests (streams included) finish with every token, new completions get 503 with
``Retry-After``, the finished requests' trajectories are in the store, and the process exits
with 0. A request that outlives ``--drain-timeout-s`` is aborted (its client gets a 503 error)
and the process still exits in time; a second signal aborts at once. In process: the drain's
answers and the abort of running generations."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from e3rl.server import cli, runner
from e3rl.server.app import create_app
from e3rl.server.settings import STORE_FILE_NAME

from .conftest import start_serve_process

# Long requests: the tiny model's context is 512 tokens.
LONG = {"prompt": "hi", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 480,
        "ignore_eos": True, "temperature": 0}


def start(model, tmp_path, *extra: str) -> tuple[subprocess.Popen, str]:
    return start_serve_process(
        ["--model", str(model), "--served-model-name", "tiny", "--data-dir",
         str(tmp_path / "data"), "--num-kv-blocks", "256", "--num-threads", "1",
         "--no-access-log", *extra], log_path=tmp_path / "server.log")


def post(url: str, path: str, body: dict) -> dict:
    """A non-streaming request: its status, body and when it ended."""
    r = httpx.post(url + path, json=body, timeout=120)
    return {"status": r.status_code, "body": r.json(), "ended": time.monotonic()}


def stream(url: str, path: str, body: dict) -> dict:
    """A streaming request: its status, its data events (JSON, ``[DONE]`` kept as a string)
    and when it ended; the JSON body instead of events when it was refused before its
    stream began (a request still waiting for its first token)."""
    events: list = []
    with httpx.stream("POST", url + path, timeout=120, json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "body": json.loads(r.read()),
                    "ended": time.monotonic()}
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return {"status": r.status_code, "events": events, "ended": time.monotonic()}


def engine_load(url: str) -> float:
    """Requests running or waiting in the engine, from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name in ("e3rl_requests_running", "e3rl_requests_waiting"))


def wait_admitted(url: str, num: int, futures: list[Future]) -> None:
    deadline = time.monotonic() + 60
    while engine_load(url) < num:
        assert not any(f.done() for f in futures), "a request ended before the signal"
        assert time.monotonic() < deadline, "the requests never all reached the engine"
        time.sleep(0.02)


def stored_ids(tmp_path) -> set[str]:
    db = tmp_path / "data" / STORE_FILE_NAME
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {row[0] for row in conn.execute("SELECT id FROM trajectories")}


def finished_whole(result: dict) -> str | None:
    """The trajectory id of a request that completed with every token, else None."""
    if result["status"] != 200:
        return None
    if "events" not in result:
        body = result["body"]
        ok = (body["choices"][0]["finish_reason"] == "length"
              and body["usage"]["completion_tokens"] == LONG["max_tokens"])
        return f"{body['id']}-0:0" if ok else None
    events = result["events"]
    chunks = [e for e in events if isinstance(e, dict) and e.get("choices")]
    usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    ok = (events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
          and usage and usage[0]["completion_tokens"] == LONG["max_tokens"])
    return f"{chunks[-1]['id']}-0:0" if ok else None


def aborted_at_shutdown(result: dict) -> bool:
    """A 503 ``shutdown`` error: the response, or a stream's last event before [DONE]."""
    if "events" not in result:
        body = result["body"]
        return result["status"] == 503 and body.get("error", {}).get("code") == "shutdown"
    events = result["events"]
    return (events[-1] == "[DONE]" and "error" in events[-2]
            and events[-2]["error"]["code"] == "shutdown")


def assert_draining(url: str) -> None:
    r = httpx.get(f"{url}/ready", timeout=10)
    assert r.status_code == 503 and r.json() == {"status": "draining"}


def test_sigterm_lets_running_requests_finish_then_exits_0(tiny_model, tmp_path):
    proc, url = start(tiny_model, tmp_path, "--max-num-seqs", "3", "--drain-timeout-s", "25")
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(stream, url, "/v1/completions", LONG) for _ in range(2)]
            futures += [pool.submit(stream, url, "/v1/chat/completions", CHAT),
                        pool.submit(post, url, "/v1/completions", LONG),
                        pool.submit(post, url, "/v1/chat/completions", CHAT)]
            wait_admitted(url, len(futures), futures)  # none has ended yet
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while httpx.get(f"{url}/ready", timeout=10).status_code == 200:
                assert time.monotonic() < deadline, "/ready did not turn 503"
                time.sleep(0.01)
            assert_draining(url)
            assert not all(f.done() for f in futures)  # 503 while they still run
            for path, body in (("/v1/completions", LONG), ("/v1/chat/completions", CHAT)):
                r = httpx.post(url + path, json=body, timeout=10)
                assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                assert r.json()["error"]["code"] == "draining"
                assert r.json()["error"]["type"] == "service_unavailable"
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            assert 'e3rl_draining{model="tiny"} 1.0' in metrics
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            results = [f.result() for f in futures]
        assert proc.wait(60) == 0
    finally:
        proc.kill()
    ids = [finished_whole(r) for r in results]
    assert all(ids), results
    assert set(ids) <= stored_ids(tmp_path)
    log = (tmp_path / "server.log").read_text()
    assert "SIGTERM: draining" in log and "for 5 running request(s)" in log
    assert "drain: every running request finished" in log
    assert "queued record(s) drained" in log and "shutdown complete; exiting" in log


def test_a_request_past_the_drain_timeout_is_aborted(tiny_model, tmp_path):
    proc, url = start(tiny_model, tmp_path, "--max-num-seqs", "1", "--drain-timeout-s", "1")
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(stream, url, "/v1/completions", LONG) for _ in range(2)]
            futures += [pool.submit(post, url, "/v1/completions", LONG) for _ in range(2)]
            wait_admitted(url, len(futures), futures)  # one after the other: 4 x 480 tokens
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert_draining(url)
            assert proc.wait(15) == 0
            exited_after_s = time.monotonic() - signalled
            results = [f.result() for f in futures]
    finally:
        proc.kill()
    assert exited_after_s < 1 + 10  # the drain timeout plus a margin for a loaded machine
    finished = [finished_whole(r) for r in results if finished_whole(r)]
    aborted = [r for r in results if aborted_at_shutdown(r)]
    assert len(finished) + len(aborted) == len(results), results
    assert len(aborted) >= 2
    stored = stored_ids(tmp_path)
    assert set(finished) <= stored and len(stored) == len(finished)  # aborted: not stored
    log = (tmp_path / "server.log").read_text()
    assert f"1 s grace period over: aborted {len(aborted)} request(s)" in log
    assert "queued record(s) drained" in log


def test_a_second_signal_aborts_at_once_and_still_flushes(tiny_model, tmp_path):
    proc, url = start(tiny_model, tmp_path, "--max-num-seqs", "1", "--drain-timeout-s", "60")
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(stream, url, "/v1/completions", LONG),
                       pool.submit(post, url, "/v1/completions", LONG)]
            wait_admitted(url, len(futures), futures)
            proc.send_signal(signal.SIGTERM)
            assert_draining(url)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(15) == 0  # long before the 60 s drain timeout
            results = [f.result() for f in futures]
    finally:
        proc.kill()
    assert any(aborted_at_shutdown(r) for r in results), results
    log = (tmp_path / "server.log").read_text()
    assert "drain: second signal: aborted" in log and "queued record(s) drained" in log


# -- in process ------------------------------------------------------------------------------
def test_drain_answers(settings, engine):
    """What a draining server answers: /ready 503 (draining), completions and chat 503 with
    Retry-After, /health and the rest as usual, e3rl_draining 1."""
    app = create_app(settings, engine=engine)
    with TestClient(app) as client:
        assert 'e3rl_draining{model="tiny"} 0.0' in client.get("/metrics").text
        app.state.drain.start()
        r = client.get("/ready")
        assert r.status_code == 503 and r.json() == {"status": "draining"}
        for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                           ("/v1/chat/completions", {"max_tokens": 2, "messages": [
                               {"role": "user", "content": "hi"}]})):
            for stream_ in (False, True):
                r = client.post(path, json={**body, "stream": stream_})
                assert r.status_code == 503 and r.headers["retry-after"] == "1"
                assert r.json() == {"error": {
                    "message": r.json()["error"]["message"], "type": "service_unavailable",
                    "param": None, "code": "draining"}}
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 200
        metrics = client.get("/metrics").text
    assert 'e3rl_draining{model="tiny"} 1.0' in metrics
    assert 'e3rl_request_errors_total{model="tiny",status="503"} 4.0' in metrics


def test_abort_running_ends_responses_and_streams_with_503(settings, engine):
    """At the drain's deadline: a running response becomes a 503 ``shutdown``, a running
    stream ends with that error and [DONE]; their engine requests are freed."""
    app = create_app(settings, engine=engine)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     timeout=60) as client:
            body = {**LONG, "max_tokens": 490}
            plain = asyncio.create_task(client.post("/v1/completions", json=body))
            streamed = asyncio.create_task(client.post("/v1/completions",
                                                       json={**body, "stream": True}))
            drain, registry = app.state.drain, app.state.metrics.registry
            for _ in range(3000):  # until both have a token: the stream's 200 is out
                if registry.get_sample_value("e3rl_time_to_first_token_seconds_count",
                                             {"model": "tiny"}) == 2:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            assert drain.num_running == 2
            assert drain.abort_running(1.0) == 2
            return await plain, await streamed, drain

    plain, streamed, drain = asyncio.run(main())
    assert plain.status_code == 503 and plain.headers["retry-after"] == "1"
    assert plain.json()["error"]["code"] == "shutdown"
    assert streamed.status_code == 200
    events = [line[len("data: "):] for line in streamed.text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutdown"
    assert drain.num_running == 0
    deadline = time.monotonic() + 10
    while engine.latest_stats.num_running_requests:  # the engine let them go
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_drain_timeout_from_flag_and_env(monkeypatch, tiny_model):
    calls = []
    monkeypatch.setattr(runner, "run_app", lambda app, settings: calls.append(settings))
    assert cli.main(["serve", "--model", str(tiny_model), "--drain-timeout-s", "2.5"]) == 0
    monkeypatch.setenv("E3RL_DRAIN_TIMEOUT_S", "7")
    assert cli.main(["serve", "--model", str(tiny_model)]) == 0
    monkeypatch.delenv("E3RL_DRAIN_TIMEOUT_S")
    assert cli.main(["serve", "--model", str(tiny_model)]) == 0
    assert [s.drain_timeout_s for s in calls] == [2.5, 7.0, 30.0]
