"""Malformed and refused requests: each gets its documented status and an OpenAI error body,
and the server answers normally right after. Auth, 413, 503 and 500 too."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient

from e3rl.engine import EngineDead, QueueFull
from e3rl.server.app import create_app, get_engine
from e3rl.server.settings import Settings

from .conftest import make_engine, make_settings

OK = {"model": "tiny", "prompt": "hello", "max_tokens": 2}

# (name, body or raw bytes, expected status, expected param)
MALFORMED = [
    ("prompt of wrong type", {"prompt": 123}, 400, "prompt"),
    ("max_tokens as string", {**OK, "max_tokens": "16"}, 400, "max_tokens"),
    ("temperature as string", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("n as bool", {**OK, "n": True}, 400, "n"),
    ("stream as string", {**OK, "stream": "yes"}, 400, "stream"),
    ("stop as number", {**OK, "stop": 5}, 400, "stop"),
    ("logprobs as float", {**OK, "logprobs": 1.5}, 400, "logprobs"),
    ("stream_options wrong", {**OK, "stream_options": {"include_usage": "x"}}, 400,
     "stream_options"),
    ("negative max_tokens", {**OK, "max_tokens": -1}, 400, "max_tokens"),
    ("zero n", {**OK, "n": 0}, 400, "n"),
    ("negative temperature", {**OK, "temperature": -0.5}, 400, "temperature"),
    ("zero top_p", {**OK, "top_p": 0.0}, 400, "top_p"),
    ("negative logprobs", {**OK, "logprobs": -1}, 400, "logprobs"),
    ("negative top_k", {**OK, "top_k": -5}, 400, "top_k"),
    ("negative token id", {**OK, "prompt": [5, -1]}, 400, "prompt"),
    ("huge max_tokens", {**OK, "max_tokens": 10 ** 12}, 400, "max_tokens"),
    ("huge n", {**OK, "n": 10 ** 6}, 400, "n"),
    ("huge logprobs", {**OK, "logprobs": 1000}, 400, "logprobs"),
    ("huge temperature", {**OK, "temperature": 1e30}, 400, "temperature"),
    ("huge token id", {**OK, "prompt": [5, 10 ** 9]}, 400, "prompt"),
    ("min_tokens over max_tokens", {**OK, "min_tokens": 5}, 400, "min_tokens"),
    ("best_of under n", {**OK, "n": 3, "best_of": 2}, 400, "best_of"),
    ("unknown field", {**OK, "frobnicate": 1}, 400, "frobnicate"),
    ("missing prompt", {"model": "tiny"}, 400, "prompt"),
    ("empty prompt", {**OK, "prompt": ""}, 400, "prompt"),
    ("empty prompt list", {**OK, "prompt": []}, 400, "prompt"),
    ("empty token list", {**OK, "prompt": [[]]}, 400, "prompt"),
    ("mixed prompt list", {**OK, "prompt": ["a", [1]]}, 400, "prompt"),
    ("prompt over the context", {**OK, "prompt": "a" * 600}, 400, "prompt"),
    ("prompt + max_tokens over the context", {**OK, "prompt": "a" * 500, "max_tokens": 20},
     400, "max_tokens"),
    ("wrong model", {**OK, "model": "gpt-4"}, 404, "model"),
    ("invalid JSON", b'{"prompt": "x",', 400, None),
    ("JSON not an object", b"[1, 2, 3]", 400, None),
    ("empty body", b"", 400, None),
    ("huge body", {**OK, "prompt": "a" * (5 * 1024 * 1024)}, 413, None),
]


def _send(client: httpx.Client, body) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post("/v1/completions", content=body,
                           headers={"content-type": "application/json"})
    return client.post("/v1/completions", json=body)


def _check_error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in r.text
    if param is not None:
        assert body["error"]["param"] == param, body
        assert param in body["error"]["message"], body


@pytest.mark.parametrize("name,body,status,param", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_then_normal_request(live, name, body, status, param):
    with httpx.Client(base_url=live.url, timeout=30) as client:
        _check_error(_send(client, body), status, param)
        ok = client.post("/v1/completions", json=OK)
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_chunked_huge_body_is_413(live):
    def chunks():
        for _ in range(6):
            yield b"x" * (1024 * 1024)

    with httpx.Client(base_url=live.url, timeout=30) as client:
        r = client.post("/v1/completions", content=chunks(),
                        headers={"content-type": "application/json"})
        _check_error(r, 413, None)


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json"}},
     "response_format"),
])
def test_malformed_chat(live, body, param):
    with httpx.Client(base_url=live.url, timeout=30) as client:
        _check_error(client.post("/v1/chat/completions", json=body), 400, param)


def test_unknown_route_and_method(live):
    with httpx.Client(base_url=live.url, timeout=30) as client:
        _check_error(client.get("/v1/nothing"), 404, None)
        _check_error(client.get("/v1/completions"), 405, None)


# -- auth --------------------------------------------------------------------------------
def test_api_key(tiny_model, engine):
    app = create_app(make_settings(tiny_model, api_key="sekret"), engine=engine)
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"},
                        {"Authorization": "Basic sekret"}):
            r = client.post("/v1/completions", json=OK, headers=headers)
            _check_error(r, 401, None)
            assert r.headers["www-authenticate"] == "Bearer"
        _check_error(client.get("/v1/models"), 401, None)
        _check_error(client.post("/tokenize", json={"prompt": "x"}), 401, None)
        good = {"Authorization": "Bearer sekret"}
        assert client.post("/v1/completions", json=OK, headers=good).status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        assert client.get("/metrics").status_code == 200  # open by default


def test_metrics_can_require_the_key(tiny_model, engine):
    app = create_app(make_settings(tiny_model, api_key="sekret", metrics_require_auth=True),
                     engine=engine)
    with TestClient(app) as client:
        _check_error(client.get("/metrics"), 401, None)
        r = client.get("/metrics", headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200 and "e3rl_requests_total" in r.text


def test_api_key_from_the_environment(monkeypatch, tiny_model):
    monkeypatch.setenv("E3RL_API_KEY", "from-env")
    monkeypatch.setenv("E3RL_MAX_NUM_SEQS", "7")
    settings = Settings(model=str(tiny_model))
    assert settings.api_key.get_secret_value() == "from-env"
    assert settings.max_num_seqs == 7
    assert "from-env" not in repr(settings)


# -- refusals from the engine ------------------------------------------------------------
class _Refusing:
    """The real engine, except that ``generate`` raises ``error``."""

    def __init__(self, inner, error: Exception):
        self.inner, self.error = inner, error

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def generate(self, *args, **kwargs):
        raise self.error
        yield  # an async generator, like the real one


@pytest.mark.parametrize("error,code", [(QueueFull("the waiting queue is full"), "queue_full"),
                                        (EngineDead("the engine loop crashed"), "engine_dead")])
@pytest.mark.parametrize("stream", [False, True])
def test_503_with_retry_after(settings, engine, error, code, stream):
    app = create_app(settings, engine=engine)
    app.dependency_overrides[get_engine] = lambda: _Refusing(engine, error)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={**OK, "stream": stream})
        _check_error(r, 503, None)
        assert r.json()["error"]["code"] == code and r.headers["retry-after"] == "1"


def test_500_does_not_leak(settings, engine):
    class Broken:
        tokenizer = engine.tokenizer
        max_model_len = engine.max_model_len

        def validate(self, prompt, params):
            raise RuntimeError("secret detail at /srv/model")

    app = create_app(settings, engine=engine)
    app.dependency_overrides[get_engine] = lambda: Broken()
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.post("/v1/completions", json=OK)
        _check_error(r, 500, None)
        assert "secret" not in r.text and "RuntimeError" not in r.text


def test_real_queue_full(tiny_model):
    """One running request and one waiting fill a queue of 1: the next one gets a 503."""
    settings = make_settings(tiny_model, max_num_seqs=1, max_waiting=1)
    engine = make_engine(settings)
    app = create_app(settings, engine=engine)
    long = {**OK, "max_tokens": 400, "ignore_eos": True}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                     timeout=60) as client:
            async def until(condition):
                for _ in range(3000):  # 30 s
                    if condition():
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError("the engine never reached the expected state")

            # More prompts than the queue holds could never be admitted: a 400, not a 503.
            batch = await client.post("/v1/completions", json={**OK, "prompt": [[5], [6]]})
            assert batch.status_code == 400, batch.text
            assert batch.json()["error"]["param"] == "prompt"
            assert "at most 1 (--max-waiting)" in batch.json()["error"]["message"]
            first = asyncio.create_task(client.post("/v1/completions", json=long))
            await until(lambda: engine.latest_stats.num_running_requests >= 1)
            second = asyncio.create_task(client.post("/v1/completions", json=long))
            await until(lambda: engine.latest_stats.num_waiting_requests >= 1)
            third = await client.post("/v1/completions", json=OK)
            return third, await first, await second

    try:
        third, first, second = asyncio.run(main())
    finally:
        engine.shutdown()
    _check_error(third, 503, None)
    assert third.headers["retry-after"] == "1"
    assert first.status_code == second.status_code == 200


def test_health_and_ready_when_the_engine_died(settings, engine):
    class Dead:
        is_alive = False
        error = RuntimeError("crashed")
        latest_stats = engine.latest_stats

    app = create_app(settings, engine=engine)
    with TestClient(app) as client:
        app.state.engine = Dead()
        assert client.get("/health").status_code == 503
        assert client.get("/ready").status_code == 503
        assert 'e3rl_engine_alive{model="tiny"} 0.0' in client.get("/metrics").text


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_engine_step_is_a_500_and_the_server_serves_on(tiny_model, stream):
    """A step that raises fails the request(s) it was running, with an OpenAI error body that
    names no internals; the engine stays up and the next request succeeds."""
    settings = make_settings(tiny_model, engine_process=False)  # to reach into the engine
    engine = make_engine(settings)
    runner = engine.engine.runner
    execute = runner.execute

    def failing(sched):
        if any(item.seq.token_ids[:1] == [99] for item in sched.scheduled):
            raise RuntimeError("secret detail at /srv/model")
        return execute(sched)

    runner.execute = failing
    try:
        with TestClient(create_app(settings, engine=engine)) as client:
            r = client.post("/v1/completions", json={**OK, "prompt": [99, 5, 6],
                                                     "stream": stream})
            # The step fails before the first chunk, so a stream answers a plain 500 too.
            _check_error(r, 500, None)
            error = r.json()["error"]
            assert error["code"] == "engine_step_failed" and "aborted" in error["message"]
            assert "secret" not in r.text
            assert client.post("/v1/completions", json=OK).status_code == 200
            assert client.get("/ready").status_code == 200
    finally:
        engine.shutdown()
