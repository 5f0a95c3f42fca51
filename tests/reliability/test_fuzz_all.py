"""What fuzzing the running server found, kept as regression tests (the fuzzing itself is
tests/reliability/test_load.py's ``test_fuzz_every_route``, and at length
benchmarks/reliability.py's ``fuzz``).

A lone UTF-16 surrogate (JSON's ``"\\ud800"``) decodes to a Python string that no UTF-8
encoder takes: in a prompt, a chat message, a stop string, a healing option or a /tokenize
prompt it reached the tokenizer and failed there with a 500. It is a 400 naming the field.
An integer past 64 bits (``top_k`` 10**30) failed to cross to the engine process with a 500,
and left a queue slot counted for ever. It is a 400."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from e3rl.server.app import create_app
from e3rl.server.protocol import has_lone_surrogate

from tests.server.conftest import make_settings

BODIES = [
    ("/v1/completions", '{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": ["ok", "x\\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"prompt": "a", "stop": ["\\udfff"], "max_tokens": 2}', "stop"),
    ("/v1/completions", '{"prompt": "a", "max_tokens": 2, '
     '"healing": {"segment_boundary": ["\\ud800"]}}', "healing"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
]


@pytest.fixture(scope="module")
def client(tiny_model, engine):
    with TestClient(create_app(make_settings(tiny_model), engine=engine)) as c:
        yield c


@pytest.mark.parametrize("path,body,param", BODIES)
def test_a_lone_surrogate_is_a_400_naming_the_field(client, path, body, param):
    r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "surrogate" in r.json()["error"]["message"]
    # Paired surrogates (an emoji written as two escapes) are valid text and still served.
    ok = body.replace("\\ud800", "\\ud83d\\ude00").replace("\\udfff", "\\ud83d\\ude00")
    assert client.post(path, content=ok,
                       headers={"Content-Type": "application/json"}).status_code == 200


def test_lone_surrogates_are_found_wherever_they_nest():
    assert has_lone_surrogate(["a", {"k": ["\udc00"]}])
    assert has_lone_surrogate({"\ud800": 1})
    assert not has_lone_surrogate(["é", "😀", 1, 2.0, None, {"k": [3]}])


@pytest.mark.parametrize("field", [{"top_k": 10**30}, {"seed": -2**70}])
def test_a_number_the_engine_process_cannot_take_is_a_400_and_leaks_no_queue_slot(
        client, engine, field):
    """Regression: ``top_k`` 10**30 passed validation, then failed to cross to the engine
    process (msgspec takes 64-bit integers) with a 500, and each such request stayed counted
    as queued for ever: ``max_waiting`` of them and every request got 503 queue_full."""
    queued = engine._num_queued
    for _ in range(3):
        r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, **field})
        assert r.status_code == 400, r.text
        assert "out of range" in r.json()["error"]["message"]
    assert engine._num_queued == queued
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code \
        == 200
