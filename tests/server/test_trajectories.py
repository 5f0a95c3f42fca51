"""The trajectory store wired into the server: every finished request's trajectories are
committed before its response is released, and ``GET /v1/trajectories`` pulls them back in
commit order with stable cursors, as JSON or JSON Lines. Store modes, a stalled writer
(bounded wait, counted drops), parameter errors and the admin key; the store id, settled
pulls and consumers' acks."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from e3rl.server.app import create_app

from .conftest import LiveServer, make_settings
from .test_completions import FORCE_HEALING

ADMIN = {"Authorization": "Bearer adm"}
HEAL = {"temperature": 1.0, "ignore_eos": True, "healing": FORCE_HEALING}


def pull_all(client, limit: int, after: int = 0, **params) -> tuple[list[dict], list[int]]:
    """Page through the log; returns the records and the cursor after each page."""
    records, cursors = [], []
    while True:
        r = client.get("/v1/trajectories", params={"after": after, "limit": limit, **params},
                       headers=ADMIN)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"object", "data", "next_cursor", "last_cursor", "store_id"}
        assert int(r.headers["x-next-cursor"]) == body["next_cursor"]
        assert r.headers["x-e3rl-store-id"] == body["store_id"]
        assert int(r.headers["x-last-cursor"]) == body["last_cursor"] >= body["next_cursor"]
        page = body["data"]
        assert len(page) <= limit
        if not page:
            assert body["next_cursor"] == after  # nothing new: the cursor stays
            if not params:  # an unfiltered read has caught up with the store
                assert body["last_cursor"] == after
            return records, cursors
        assert body["next_cursor"] == page[-1]["cursor"]
        assert all(rec["cursor"] > after for rec in page)
        records += page
        after = body["next_cursor"]
        cursors.append(after)


def stored_ids(client) -> list[str]:
    r = client.get("/v1/trajectories", params={"limit": 10_000}, headers=ADMIN)
    return [rec["id"] for rec in r.json()["data"]]


def stream_events(client, path: str, body: dict) -> list[dict]:
    """The stream's events; checks that when a request's last chunk arrives (before
    [DONE]), its trajectory is already committed."""
    events = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
                if events[-1]["choices"][0]["finish_reason"]:
                    with httpx.Client(base_url=str(client.base_url)) as other:
                        assert f"{events[-1]['id']}-0:0" in stored_ids(other)
    return events


@pytest.fixture(scope="module")
def server(tiny_model):
    live = LiveServer(create_app(make_settings(tiny_model, admin_key="adm")))
    yield live
    live.stop()


def test_live_pull_returns_every_trajectory_in_order_with_its_erasures(server):
    expected: list[tuple[str, dict | None, str | None]] = []  # (id, e3rl extension, text)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for i in range(4):
            r = c.post("/v1/completions", json={"prompt": f"heal {i}:", "max_tokens": 16,
                                                "seed": i, "n": 2, **HEAL})
            assert r.status_code == 200, r.text
            body = r.json()
            # The response came after its trajectories were committed.
            assert stored_ids(c)[-2:] == [f"{body['id']}-0:0", f"{body['id']}-0:1"]
            for choice in body["choices"]:
                assert choice["e3rl"]["num_erasures"] > 0
                expected.append((f"{body['id']}-0:{choice['index']}", choice["e3rl"],
                                 choice["text"]))
        events = stream_events(c, "/v1/completions", {"prompt": "stream:", "max_tokens": 12,
                                                      "seed": 7, **HEAL})
        last = [e for e in events if e["choices"][0]["finish_reason"]][-1]["choices"][0]
        expected.append((f"{events[0]['id']}-0:0", last["e3rl"],
                         "".join(e["choices"][0]["text"] for e in events)))
        r = c.post("/v1/completions", json={"prompt": "plain", "max_tokens": 5})
        expected.append((f"{r.json()['id']}-0:0", None, r.json()["choices"][0]["text"]))
        r = c.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6})
        expected.append((f"{r.json()['id']}-0:0", None,
                         r.json()["choices"][0]["message"]["content"]))

        everything, _ = pull_all(c, limit=1000)
        assert [rec["id"] for rec in everything] == [e[0] for e in expected]  # commit order
        cursors = [rec["cursor"] for rec in everything]
        assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
        for rec, (_, ext, text) in zip(everything, expected):
            assert rec["text"] == text and rec["weight_version"] == "0"
            assert rec["model"] == "tiny" and rec["finish_reason"] == "length"
            assert len(rec["output_token_ids"]) == len(rec["logprobs"]) == len(rec["nll"]) \
                == len(rec["entropy"]) == rec["num_output_tokens"]
            if ext is not None:  # the erasure events the client saw, in full
                assert rec["erasures"] == ext["erasures"] and rec["num_erasures"] > 0
                assert rec["num_computed_tokens"] == ext["num_computed_tokens"]
                assert rec["healing_params"]["max_erasures"] == 20
                assert rec["segments"]
            else:
                assert rec["erasures"] == [] and rec["healing_params"] is None

        # Paging with a small limit covers everything exactly once, with correct cursors.
        for limit in (1, 3, 7):
            paged, page_cursors = pull_all(c, limit=limit)
            assert paged == everything
            assert page_cursors == cursors[limit - 1::limit] + (
                [cursors[-1]] if len(cursors) % limit else [])
        # Starting mid-way returns the rest; re-reading a range gives the same records.
        rest, _ = pull_all(c, limit=5, after=cursors[3])
        assert rest == everything[4:]
        assert pull_all(c, limit=5, after=cursors[3])[0] == rest

        # JSON Lines, by parameter or by Accept header: the same records.
        for kwargs in ({"params": {"format": "jsonl", "limit": 1000}},
                       {"params": {"limit": 1000},
                        "headers": {**ADMIN, "Accept": "application/x-ndjson"}}):
            kwargs.setdefault("headers", ADMIN)
            r = c.get("/v1/trajectories", **kwargs)
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = r.text.splitlines()
            assert [json.loads(line) for line in lines] == everything
            assert int(r.headers["x-next-cursor"]) == cursors[-1]

        healed, _ = pull_all(c, limit=100, erasures_only="true")
        assert healed == [rec for rec in everything if rec["num_erasures"]]
        assert len(healed) == 9
        assert pull_all(c, limit=100, weight_version="0")[0] == everything
        assert pull_all(c, limit=100, weight_version="nope")[0] == []

        metrics = {s.name: s.value for f in text_string_to_metric_families(
            c.get("/metrics").text) for s in f.samples}
        assert metrics["e3rl_trajectories_written_total"] == len(everything)
        assert metrics["e3rl_trajectories_dropped_total"] == 0
        assert metrics["e3rl_trajectory_commit_wait_seconds_count"] == 7  # one per request
        assert metrics["e3rl_trajectory_commit_timeouts_total"] == 0


@pytest.mark.parametrize("params, param", [
    ({"after": -1}, "after"), ({"after": "x"}, "after"), ({"limit": 0}, "limit"),
    ({"limit": 10_001}, "limit"), ({"limit": "1.5"}, "limit"), ({"format": "xml"}, "format"),
    ({"erasures_only": "maybe"}, "erasures_only"), ({"settled_s": "-1"}, "settled_s"),
    ({"settled_s": "x"}, "settled_s"), ({"settled_s": "nan"}, "settled_s"),
    ({"settled_s": "inf"}, "settled_s")])
def test_bad_parameters_are_400_naming_the_parameter(server, params, param):
    r = httpx.get(f"{server.url}/v1/trajectories", params=params, headers=ADMIN)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert len(r.headers["x-e3rl-store-id"]) == 32


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "adm"}])
def test_the_admin_key_is_required(server, headers):
    r = httpx.get(f"{server.url}/v1/trajectories", headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_admin_key"
    assert r.headers["www-authenticate"] == "Bearer"


def test_admin_routes_are_off_without_an_admin_key(settings, engine):
    with TestClient(create_app(settings, engine=engine)) as client:
        r = client.get("/v1/trajectories", headers=ADMIN)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "admin_disabled" and "--admin-key" in error["message"]


def test_admin_key_must_differ_from_the_api_key(tiny_model):
    with pytest.raises(ValueError, match="admin_key must differ"):
        make_settings(tiny_model, api_key="same", admin_key="same")


def _complete(client, **body):
    r = client.post("/v1/completions", json={"max_tokens": 4, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_mode_erasures_keeps_only_healed_requests(tiny_model, engine):
    settings = make_settings(tiny_model, admin_key="adm", store="erasures")
    with TestClient(create_app(settings, engine=engine)) as client:
        healed = _complete(client, prompt="abc", max_tokens=16, seed=1, **HEAL)
        _complete(client, prompt="abc")
        records = client.get("/v1/trajectories", headers=ADMIN).json()["data"]
    assert [r["id"] for r in records] == [f"{healed['id']}-0:0"]


def test_mode_none_creates_no_store_but_keeps_an_old_one_readable(tiny_model, engine):
    settings = make_settings(tiny_model, admin_key="adm", store="none")
    with TestClient(create_app(settings, engine=engine)) as client:
        _complete(client, prompt="abc")
        r = client.get("/v1/trajectories", headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "store_disabled"
    assert not settings.store_path.exists()
    # A store written before (mode all) stays pullable, and nothing more is written.
    written = settings.model_copy(update={"store": "all"})
    with TestClient(create_app(written, engine=engine)) as client:
        first = _complete(client, prompt="abc")
    with TestClient(create_app(settings, engine=engine)) as client:
        _complete(client, prompt="abc")
        records = client.get("/v1/trajectories", headers=ADMIN).json()["data"]
    assert [r["id"] for r in records] == [f"{first['id']}-0:0"]


def test_a_stalled_writer_delays_responses_boundedly_and_drops_are_counted(tiny_model,
                                                                           engine):
    """Another connection holds the database's write lock: the first trajectory is stuck in
    the writer's transaction, the second waits in the queue (bound 1), the third is dropped.
    Every response still comes, after at most ``store_wait_s``; timeouts and the drop are
    counted; once the lock is released the queued trajectories are committed."""
    # A wait far above a request's own time (tens of ms; ~0.35 s seen on a loaded machine),
    # so that "held for the wait" and "not held" cannot be confused.
    settings = make_settings(tiny_model, admin_key="adm", store_max_queue=1,
                             store_wait_s=1.0)
    with TestClient(create_app(settings, engine=engine)) as client:
        blocker = sqlite3.connect(settings.store_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            ids, waits = [], []
            for i in range(3):
                t0 = time.monotonic()
                ids.append(_complete(client, prompt=f"stall {i}")["id"])
                waits.append(time.monotonic() - t0)
            # The first two were held for their commit until the wait ran out; the third,
            # dropped, had nothing to wait for.
            assert all(1.0 <= w < 5 for w in waits[:2]) and waits[2] < 1.0, waits
            text = client.get("/metrics").text
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        samples = {s.name: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples}
        assert samples["e3rl_trajectory_commit_timeouts_total"] == 2
        assert samples["e3rl_trajectories_dropped_total"] == 1
        store = client.app.state.store
        deadline = time.monotonic() + 20
        while store.num_written < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        records = client.get("/v1/trajectories", headers=ADMIN).json()["data"]
    assert [r["id"] for r in records] == [f"{i}-0:0" for i in ids[:2]]
    assert store.num_failed == 0


def test_concurrent_requests_are_all_stored(server):
    """Many requests at once share group commits; each one's trajectory is in the log."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        start = c.get("/v1/trajectories", params={"limit": 10_000}, headers=ADMIN).json()
    ids: list[str] = []

    def one(i: int) -> None:
        r = httpx.post(f"{server.url}/v1/completions", json={
            "prompt": f"c{i}", "max_tokens": 3, "n": 2, "temperature": 1.0, "seed": i},
            timeout=60)
        assert r.status_code == 200
        ids.extend(f"{r.json()['id']}-0:{k}" for k in range(2))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with httpx.Client(base_url=server.url, timeout=60) as c:
        new, _ = pull_all(c, limit=5, after=start["next_cursor"])
    assert sorted(r["id"] for r in new) == sorted(ids) and len(ids) == 24


# -- store id, settled pulls, acks -------------------------------------------------------------

@pytest.fixture
def admin_app(tiny_model):
    """Settings of an app with the admin key and a fresh store (the session engine is
    passed in by each test)."""
    return make_settings(tiny_model, admin_key="adm")


def test_store_id_is_in_every_answer_and_stable_across_restarts(admin_app, engine):
    with TestClient(create_app(admin_app, engine=engine)) as client:
        _complete(client, prompt="abc")
        store_id = client.app.state.store.store_id
        r = client.get("/v1/trajectories", headers=ADMIN)
        assert r.json()["store_id"] == r.headers["x-e3rl-store-id"] == store_id
        r = client.get("/v1/trajectories", params={"format": "jsonl"}, headers=ADMIN)
        assert r.headers["x-e3rl-store-id"] == store_id
    with TestClient(create_app(admin_app, engine=engine)) as client:
        assert client.get("/v1/trajectories", headers=ADMIN).json()["store_id"] == store_id
    other = admin_app.model_copy(update={"data_dir": admin_app.data_dir / "other"})
    with TestClient(create_app(other, engine=engine)) as client:
        assert client.get("/v1/trajectories", headers=ADMIN).json()["store_id"] != store_id


def test_settled_pull_waits_for_young_records_without_skipping_them(admin_app, engine):
    with TestClient(create_app(admin_app, engine=engine)) as client:
        ids = [_complete(client, prompt=f"p{i}")["id"] for i in range(3)]
        r = client.get("/v1/trajectories", params={"settled_s": "3600"}, headers=ADMIN)
        assert r.json()["data"] == [] and r.json()["next_cursor"] == 0
        assert r.headers["x-next-cursor"] == "0"
        r = client.get("/v1/trajectories", params={"settled_s": "3600", "format": "jsonl"},
                       headers=ADMIN)
        assert r.text == "" and r.headers["x-next-cursor"] == "0"
        body = client.get("/v1/trajectories", params={"settled_s": "0"}, headers=ADMIN).json()
        assert [rec["id"] for rec in body["data"]] == [f"{i}-0:0" for i in ids]
        assert all(rec["feedback"] is None for rec in body["data"])


def _ack(client, body: dict, headers: dict = ADMIN):
    return client.post("/v1/trajectories/ack", json=body, headers=headers)


def test_ack_is_monotonic_checked_against_the_store_and_exported(admin_app, engine):
    with TestClient(create_app(admin_app, engine=engine)) as client:
        for i in range(3):
            _complete(client, prompt=f"a{i}")
        store_id = client.get("/v1/trajectories", headers=ADMIN).json()["store_id"]
        r = _ack(client, {"consumer": "trainer", "cursor": 2, "store_id": store_id})
        assert r.status_code == 200, r.text
        assert r.json() == {"object": "trajectories.ack", "consumer": "trainer", "cursor": 2,
                            "store_id": store_id}
        assert r.headers["x-e3rl-store-id"] == store_id
        # A smaller (retried, reordered) ack leaves the cursor; store_id is optional.
        assert _ack(client, {"consumer": "trainer", "cursor": 1}).json()["cursor"] == 2
        assert _ack(client, {"consumer": "trainer", "cursor": 3}).json()["cursor"] == 3

        r = _ack(client, {"consumer": "trainer", "cursor": 3, "store_id": "0" * 32})
        assert r.status_code == 409
        error = r.json()["error"]
        assert error["code"] == "store_mismatch" and error["param"] == "store_id"
        assert "replaced" in error["message"] and store_id in error["message"]
        assert r.headers["x-e3rl-store-id"] == store_id
        # An id that is not even well-formed is just another store's (and never echoed);
        # one that is not valid text is refused as a bad body, never a 500.
        r = _ack(client, {"consumer": "trainer", "cursor": 3, "store_id": "<x>"})
        assert r.status_code == 409 and "<x>" not in r.json()["error"]["message"]
        r = client.post("/v1/trajectories/ack", headers=ADMIN, content=b'{"consumer": '
                        b'"trainer", "cursor": 3, "store_id": "\\ud800"}')
        assert r.status_code == 400

        r = _ack(client, {"consumer": "trainer", "cursor": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cursor"
        assert "beyond the newest" in r.json()["error"]["message"]
        for body, param in (({"consumer": "t", "cursor": "3"}, "cursor"),
                            ({"consumer": "t", "cursor": -1}, "cursor"),
                            ({"consumer": "", "cursor": 1}, "consumer"),
                            ({"consumer": "a\nb", "cursor": 1}, "consumer"),
                            ({"cursor": 1}, "consumer"),
                            ({"consumer": "t", "cursor": 1, "extra": 1}, "extra")):
            r = _ack(client, body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, body
        assert client.app.state.store.consumers() == {"trainer": 3}

        text = client.get("/metrics").text
        samples = {s.name: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples}
        assert samples["e3rl_trajectories_acked_cursor"] == 3
        assert samples["e3rl_trajectories_evicted_unacked_total"] == 0

        r = _ack(client, {"consumer": "trainer", "cursor": 3}, headers={})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"


def test_ack_without_a_store_is_404(tiny_model, engine):
    settings = make_settings(tiny_model, admin_key="adm", store="none")
    with TestClient(create_app(settings, engine=engine)) as client:
        r = _ack(client, {"consumer": "trainer", "cursor": 0})
    assert r.status_code == 404 and r.json()["error"]["code"] == "store_disabled"
