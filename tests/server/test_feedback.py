"""``POST /v1/feedback``: a reward or a reference lands on the stored trajectory of exactly the
choice it names (2 prompts x n=2, and chat), is returned by the pull API in the record's
``feedback``, replaces an earlier one; unknown choices are 404s, bad bodies 400s naming the
field, the API key guards the route, and ``e3rl_feedback_total`` counts every outcome."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from e3rl.server.app import create_app

from .conftest import make_settings

API = {"Authorization": "Bearer key"}
ADMIN = {"Authorization": "Bearer adm"}


@pytest.fixture(scope="module")
def client(tiny_model, engine):
    settings = make_settings(tiny_model, api_key="key", admin_key="adm")
    with TestClient(create_app(settings, engine=engine)) as c:
        yield c


def feedback_counts(client) -> dict[str, float]:
    text = client.get("/metrics", headers=API).text
    return {s.labels["result"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "e3rl_feedback_total"}


def records_by_id(client) -> dict[str, dict]:
    r = client.get("/v1/trajectories", params={"limit": 10_000}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return {rec["id"]: rec for rec in r.json()["data"]}


def post_feedback(client, body: dict, headers: dict = API):
    return client.post("/v1/feedback", json=body, headers=headers)


def test_each_choice_feedback_lands_on_its_own_trajectory(client):
    before = feedback_counts(client)
    r = client.post("/v1/completions", headers=API, json={
        "prompt": ["first", "second"], "n": 2, "max_tokens": 3, "temperature": 1.0,
        "seed": 5, "ignore_eos": True})
    assert r.status_code == 200, r.text
    completion = r.json()
    assert [c["index"] for c in completion["choices"]] == [0, 1, 2, 3]
    for choice in completion["choices"]:
        r = post_feedback(client, {"id": completion["id"], "index": choice["index"],
                                   "reward": choice["index"] / 10})
        assert r.status_code == 200, r.text
        prompt_index, sample_index = divmod(choice["index"], 2)
        assert r.json() == {"object": "feedback", "id": completion["id"],
                            "index": choice["index"], "reference": None,
                            "trajectory_id": f"{completion['id']}-{prompt_index}:"
                                             f"{sample_index}",
                            "reward": choice["index"] / 10}
    chat = client.post("/v1/chat/completions", headers=API, json={
        "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 3,
        "temperature": 1.0, "seed": 2}).json()
    r = post_feedback(client, {"id": chat["id"], "index": 1, "reference": "42"})
    assert r.status_code == 200 and r.json()["trajectory_id"] == f"{chat['id']}-0:1"

    records = records_by_id(client)
    for choice in completion["choices"]:
        prompt_index, sample_index = divmod(choice["index"], 2)
        record = records[f"{completion['id']}-{prompt_index}:{sample_index}"]
        # The right trajectory: its prompt, and the very text the client received.
        assert record["prompt"] == ["first", "second"][prompt_index]
        assert record["text"] == choice["text"]
        assert record["feedback"]["reward"] == choice["index"] / 10
        assert record["feedback"]["reference"] is None
        assert record["feedback"]["received_at"] > record["created_at"]
    assert records[f"{chat['id']}-0:0"]["feedback"] is None
    assert records[f"{chat['id']}-0:1"]["feedback"]["reference"] == "42"
    assert records[f"{chat['id']}-0:1"]["feedback"]["reward"] is None

    # A later feedback replaces the earlier one (a reference for a rewarded choice).
    r = post_feedback(client, {"id": completion["id"], "index": 2, "reference": "x"})
    assert r.status_code == 200
    feedback = records_by_id(client)[f"{completion['id']}-1:0"]["feedback"]
    assert feedback["reward"] is None and feedback["reference"] == "x"
    # The same records as JSON Lines.
    r = client.get("/v1/trajectories", params={"format": "jsonl", "limit": 10_000},
                   headers=ADMIN)
    assert '"feedback":{"reward":null,"reference":"x"' in r.text

    after = feedback_counts(client)
    assert after["stored"] - before["stored"] == 6
    assert after["not_found"] == before["not_found"]
    assert after["invalid"] == before["invalid"]


def test_unknown_choices_are_404_trajectory_not_found(client):
    completion = client.post("/v1/completions", headers=API, json={
        "prompt": "abc", "max_tokens": 2}).json()
    before = feedback_counts(client)
    for body in ({"id": "cmpl-nope", "reward": 1.0},
                 {"id": completion["id"], "index": 1, "reward": 1.0},  # n = 1
                 {"id": f"{completion['id']}-0", "reward": 1.0}):  # an engine request id
        r = post_feedback(client, body)
        assert r.status_code == 404
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "not_found_error" and error["code"] == "trajectory_not_found"
        assert error["param"] == "id" and body["id"] in error["message"]
    after = feedback_counts(client)
    assert after["not_found"] - before["not_found"] == 3
    assert after["stored"] == before["stored"] and after["invalid"] == before["invalid"]


@pytest.mark.parametrize("body, param", [
    ({"reward": 1.0}, "id"),
    ({"id": "", "reward": 1.0}, "id"),
    ({"id": 7, "reward": 1.0}, "id"),
    ({"id": "cmpl-x"}, "reward"),
    ({"id": "cmpl-x", "reward": None, "reference": None}, "reward"),
    ({"id": "cmpl-x", "reward": 1.0, "reference": "a"}, "reference"),
    ({"id": "cmpl-x", "reward": "1"}, "reward"),
    ({"id": "cmpl-x", "reward": True}, "reward"),
    (b'{"id": "cmpl-x", "reward": 1e400}', "reward"),  # inf once parsed
    (b'{"id": "cmpl-x", "reward": NaN}', "reward"),
    ({"id": "cmpl-x", "reference": 3}, "reference"),
    ({"id": "cmpl-x", "index": -1, "reward": 1.0}, "index"),
    ({"id": "cmpl-x", "index": 1.5, "reward": 1.0}, "index"),
    ({"id": "cmpl-x", "index": "0", "reward": 1.0}, "index"),
    ({"id": "cmpl-x", "reward": 1.0, "score": 2}, "score"),
])
def test_bad_bodies_are_400_naming_the_field(client, body, param):
    before = feedback_counts(client)["invalid"]
    if isinstance(body, bytes):  # not expressible as a Python dict sent as strict JSON
        r = client.post("/v1/feedback", content=body,
                        headers={**API, "Content-Type": "application/json"})
    else:
        r = post_feedback(client, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param in error["message"]
    assert feedback_counts(client)["invalid"] == before + 1


@pytest.mark.parametrize("content", [b"not json", b"[1]", b""])
def test_a_body_that_is_no_json_object_is_400(client, content):
    before = feedback_counts(client)["invalid"]
    r = client.post("/v1/feedback", content=content,
                    headers={**API, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert feedback_counts(client)["invalid"] == before + 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, ADMIN])
def test_the_api_key_is_required(client, headers):
    before = feedback_counts(client)
    r = post_feedback(client, {"id": "cmpl-x", "reward": 1.0}, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert feedback_counts(client) == before  # refused before the route: not counted


def test_without_a_store_feedback_is_404_store_disabled(tiny_model, engine):
    settings = make_settings(tiny_model, store="none")
    with TestClient(create_app(settings, engine=engine)) as client:
        r = post_feedback(client, {"id": "cmpl-x", "reward": 1.0}, headers={})
        assert r.status_code == 404 and r.json()["error"]["code"] == "store_disabled"
        assert feedback_counts(client) == {"stored": 0, "not_found": 1, "invalid": 0}
