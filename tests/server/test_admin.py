"""``POST /v1/admin/weights`` on a live server: bad checkpoints and bad credentials are refused
with a clear error while the old weights keep serving (greedy output unchanged); a second
swap during one is a 409; a swap under streaming load fails no request, every chunk reports
the version that generated it, and afterwards greedy output equals Hugging Face ``generate``
with the new weights."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from e3rl.engine.model_factory import build_tiny_model
from e3rl.server.app import create_app

from tests.conftest import hf_greedy

from .conftest import LiveServer, make_settings

ADMIN = {"Authorization": "Bearer adm"}
GREEDY = {"prompt": "The cat", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
TENSOR = "model.layers.0.mlp.up_proj.weight"
NUM_LOAD_TOKENS = 96


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model):
    """--checkpoint-dir with a good checkpoint ("new": same architecture, other seed), the
    variants to refuse, and a valid checkpoint outside it."""
    root = tmp_path_factory.mktemp("ckpt-root")
    ckpts = root / "ckpts"
    new = build_tiny_model(ckpts / "new", "qwen3", seed=2)
    outside = shutil.copytree(new, root / "outside")
    tensors = load_file(str(new / "model.safetensors"))

    def variant(name, edit):
        path = ckpts / name
        path.mkdir()
        edited = dict(tensors)
        edit(edited)
        save_file(edited, str(path / "model.safetensors"))

    variant("missing", lambda t: t.pop(TENSOR))
    variant("extra", lambda t: t.update(extra=torch.zeros(2)))
    variant("shape", lambda t: t.update({TENSOR: t[TENSOR][:-1].clone()}))
    variant("dtype", lambda t: t.update({TENSOR: t[TENSOR].double()}))
    variant("nan", lambda t: t.update({TENSOR: torch.full_like(t[TENSOR], float("nan"))}))
    truncated = shutil.copytree(new, ckpts / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    pickle = ckpts / "pickle"
    pickle.mkdir()
    torch.save({"w": torch.zeros(1)}, pickle / "pytorch_model.bin")
    os.symlink(outside, ckpts / "escape")
    return ckpts, new, outside


@pytest.fixture(scope="module")
def server(tiny_model, checkpoints):
    live = LiveServer(create_app(make_settings(tiny_model, admin_key="adm",
                                               checkpoint_dir=str(checkpoints[0]))))
    yield live
    live.stop()


def greedy_text(url: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json=GREEDY, timeout=60)
    assert r.status_code == 200
    return r.json()["choices"][0]["text"]


def served_version(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["weight_version"]


def swap(url: str, path, version: str = "2", headers=ADMIN) -> httpx.Response:
    return httpx.post(f"{url}/v1/admin/weights", json={"path": str(path), "version": version},
                      headers=headers, timeout=60)


@pytest.mark.parametrize("path, status, code, says", [
    ("../outside", 400, "invalid_checkpoint", "must not contain '..'"),
    ("OUTSIDE", 400, "invalid_checkpoint", "resolves outside the checkpoint directory"),
    ("escape", 400, "invalid_checkpoint", "resolves outside the checkpoint directory"),
    ("does-not-exist", 400, "invalid_checkpoint", "is not a directory"),
    ("pickle", 400, "invalid_checkpoint", "no .safetensors file"),
    ("missing", 400, "invalid_checkpoint", f"missing 1 tensor(s), e.g. '{TENSOR}'"),
    ("extra", 400, "invalid_checkpoint", "1 unexpected tensor(s), e.g. 'extra'"),
    ("shape", 400, "invalid_checkpoint", f"'{TENSOR}' has shape (127, 64)"),
    ("dtype", 400, "invalid_checkpoint", f"'{TENSOR}' has dtype torch.float64"),
    ("nan", 400, "invalid_checkpoint", "NaN or infinite"),
    ("truncated", 400, "invalid_checkpoint", "cannot read model.safetensors"),
])
def test_bad_checkpoints_are_refused_and_the_old_weights_keep_serving(server, checkpoints,
                                                                      path, status, code,
                                                                      says):
    before = greedy_text(server.url)
    if path == "OUTSIDE":
        path = checkpoints[2]  # absolute, a valid checkpoint, but outside the root
    r = swap(server.url, path)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["param"] == "path"
    assert says in error["message"] and "still serving version 0" in error["message"]
    assert served_version(server.url) == "0"
    assert greedy_text(server.url) == before


@pytest.mark.parametrize("headers, status, code", [
    ({}, 401, "invalid_admin_key"), ({"Authorization": "Bearer wrong"}, 401,
                                     "invalid_admin_key"),
    ({"Authorization": "Basic adm"}, 401, "invalid_admin_key")])
def test_wrong_admin_key_is_refused(server, checkpoints, headers, status, code):
    before = greedy_text(server.url)
    r = swap(server.url, "new", headers=headers)
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert served_version(server.url) == "0" and greedy_text(server.url) == before


def test_bad_bodies_name_the_field(server):
    for body, param in [({"path": "new"}, "version"), ({"path": "new", "version": ""},
                                                       "version"),
                        ({"path": 3, "version": "2"}, "path"),
                        ({"path": "new", "version": "2", "x": 1}, "x")]:
        r = httpx.post(f"{server.url}/v1/admin/weights", json=body, headers=ADMIN)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert served_version(server.url) == "0"


def test_no_admin_key_configured_means_the_admin_routes_are_off(tiny_model, engine,
                                                                checkpoints):
    app = create_app(make_settings(tiny_model, checkpoint_dir=str(checkpoints[0])),
                     engine=engine)
    with TestClient(app) as client:
        before = client.post("/v1/completions", json=GREEDY).json()["choices"][0]["text"]
        r = client.post("/v1/admin/weights", json={"path": "new", "version": "2"},
                        headers=ADMIN)
        assert r.status_code == 404 and r.json()["error"]["code"] == "admin_disabled"
        after = client.post("/v1/completions", json=GREEDY).json()["choices"][0]["text"]
    assert after == before and engine.latest_stats.weight_version == "0"


def test_no_checkpoint_dir_configured_refuses_weight_updates(tiny_model, engine):
    app = create_app(make_settings(tiny_model, admin_key="adm"), engine=engine)
    with TestClient(app) as client:
        r = client.post("/v1/admin/weights", json={"path": "new", "version": "2"},
                        headers=ADMIN)
    assert r.status_code == 403 and r.json()["error"]["code"] == "weight_updates_disabled"
    assert engine.latest_stats.weight_version == "0"


def test_a_second_swap_while_one_runs_is_409(server):
    """An update holds the lock from its start (here an upload whose body is still coming,
    as from a slow trainer); a swap from a directory meanwhile gets 409. The upload is then
    abandoned mid-body, so the served weights stay at version 0 and the lock is free again."""
    release = threading.Event()

    def body():
        yield b"x" * 1024
        release.wait(30)
        raise ConnectionAbortedError("the uploader gives up")

    def upload():
        try:
            httpx.post(f"{server.url}/v1/admin/weights/upload", params={"version": "9"},
                       content=body(), timeout=60,
                       headers={**ADMIN, "Content-Type": "application/octet-stream"})
        except Exception:  # the body generator's error ends the request on our side
            pass

    first = threading.Thread(target=upload)
    first.start()
    try:
        deadline = time.monotonic() + 30
        while not httpx.get(f"{server.url}/v1/admin/weights", headers=ADMIN).json()["updating"]:
            assert time.monotonic() < deadline, "the upload never started"
            time.sleep(0.02)
        second = swap(server.url, "new")
    finally:
        release.set()
        first.join(60)
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "weight_update_in_progress"
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/v1/admin/weights", headers=ADMIN).json()["updating"]:
        assert time.monotonic() < deadline, "the abandoned upload kept the lock"
        time.sleep(0.02)
    assert served_version(server.url) == "0"


async def _stream(client: httpx.AsyncClient, prompt: str, chunks: list) -> None:
    body = {"prompt": prompt, "max_tokens": NUM_LOAD_TOKENS, "temperature": 0,
            "ignore_eos": True, "logprobs": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
            elif line == "data: [DONE]":
                chunks.append("DONE")


def test_swap_under_streaming_load(server, checkpoints):
    _, new, _ = checkpoints
    num_clients = 6
    prompts = [f"load {i}:" for i in range(num_clients)]
    chunks: list[list] = [[] for _ in prompts]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            tasks = [asyncio.create_task(_stream(client, p, c)) for p, c in zip(prompts, chunks)]
            whole = [asyncio.create_task(client.post("/v1/completions", json={
                "prompt": f"whole {i}:", "max_tokens": NUM_LOAD_TOKENS, "temperature": 0,
                "ignore_eos": True})) for i in range(2)]
            # Swap once every stream is under way (a few tokens in, far from done).
            while not all(len(c) >= 3 for c in chunks):
                await asyncio.sleep(0.005)
            r = await client.post("/v1/admin/weights", json={"path": "new", "version": "2"},
                                  headers=ADMIN)
            await asyncio.gather(*tasks)
            return r, await asyncio.gather(*whole)

    r, whole = asyncio.run(main())
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "2" and r.json()["previous_version"] == "0"
    assert served_version(server.url) == "2"

    with httpx.Client(base_url=server.url, timeout=60) as c:
        records = {rec["id"]: rec for rec in c.get(
            "/v1/trajectories", params={"limit": 10_000}, headers=ADMIN).json()["data"]}
        metrics = c.get("/metrics").text
    generated = {}
    for prompt, events in zip(prompts, chunks):
        assert events[-1] == "DONE"  # no request failed
        events = events[:-1]
        assert all("error" not in e for e in events)
        versions = [e["system_fingerprint"] for e in events]
        # Each chunk carries the version that generated its tokens: old, then new.
        assert set(versions) <= {"e3rl-w0", "e3rl-w2"}
        assert versions == sorted(versions, key=lambda v: v == "e3rl-w2")
        num_old = sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events
                      if e["system_fingerprint"] == "e3rl-w0")
        assert 0 < num_old < NUM_LOAD_TOKENS  # every stream straddled the swap
        record = records[f"{events[0]['id']}-0:0"]
        assert record["weight_versions"] == [[0, "0"], [num_old, "2"]]
        assert record["weight_version"] == "2"
        assert record["num_output_tokens"] == NUM_LOAD_TOKENS
        generated[prompt] = (record["prompt_token_ids"], record["output_token_ids"], num_old)

    for response in whole:  # non-streamed: the version of its newest tokens
        assert response.status_code == 200
        record = records[f"{response.json()['id']}-0:0"]
        assert response.json()["system_fingerprint"] == f"e3rl-w{record['weight_version']}"
        assert record["weight_versions"][-1][1] == record["weight_version"] == "2"
        generated[record["id"]] = (record["prompt_token_ids"], record["output_token_ids"],
                                   record["weight_versions"][-1][0])

    # Every token generated after the swap is the new weights' greedy choice given the
    # whole prefix (its KV was recomputed with the new weights).
    model = AutoModelForCausalLM.from_pretrained(new, local_files_only=True)
    for prompt_ids, output_ids, num_old in generated.values():
        ids = prompt_ids + output_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        p = len(prompt_ids)
        assert [int(logits[p + i - 1].argmax()) for i in range(num_old, NUM_LOAD_TOKENS)] \
            == output_ids[num_old:]

    # After the swap: greedy output equals HF generate with the new weights.
    r = httpx.post(f"{server.url}/v1/completions", json=GREEDY, timeout=60)
    assert r.json()["system_fingerprint"] == "e3rl-w2"
    record = record_of(server.url, r.json()["id"])
    assert record["weight_versions"] == [[0, "2"]]
    [reference] = hf_greedy(new, [record["prompt_token_ids"]], GREEDY["max_tokens"])
    assert record["output_token_ids"] == reference
    assert record["text"] == r.json()["choices"][0]["text"]

    samples = {(s.name, s.labels.get("version")): s.value
               for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples[("e3rl_weights_version", "2")] == 2


def record_of(url: str, response_id: str) -> dict:
    records = httpx.get(f"{url}/v1/trajectories", params={"limit": 10_000}, headers=ADMIN,
                        timeout=10).json()["data"]
    [record] = [r for r in records if r["id"] == f"{response_id}-0:0"]
    return record


def test_get_weight_version(server, checkpoints):
    """``GET /v1/admin/weights`` says what ``/v1/models`` says, under the admin key only."""
    r = httpx.get(f"{server.url}/v1/admin/weights", headers=ADMIN)
    assert r.status_code == 200
    body = r.json()
    assert body == {"object": "weight_version", "model": body["model"],
                    "version": served_version(server.url), "updating": False}
    assert httpx.get(f"{server.url}/v1/admin/weights").status_code == 401
