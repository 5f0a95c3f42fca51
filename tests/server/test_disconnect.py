"""50 concurrent streaming clients, half of which hang up midway: the others complete, the
aborted requests free their KV blocks, and the engine ends idle (as /metrics reports it)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from e3rl.server.app import create_app

from .conftest import LiveServer, make_settings

NUM_CLIENTS = 50
FULL_TOKENS = 32


def scrape(url: str) -> dict[str, float]:
    """``{sample name (with labels): value}`` from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model")
            values[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return values


@pytest.fixture(scope="module")
def server(tiny_model):
    live = LiveServer(create_app(make_settings(tiny_model, num_kv_blocks=1024)))
    yield live
    live.stop()


async def _client(client: httpx.AsyncClient, i: int, hang_up: bool) -> dict:
    body = {"model": "tiny", "prompt": f"client {i}:", "stream": True, "temperature": 0.8,
            "seed": i, "ignore_eos": True, "max_tokens": 400 if hang_up else FULL_TOKENS,
            "stream_options": {"include_usage": True}}
    text, finish, done, usage = "", None, False, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[len("data: "):])
            if event["usage"] is not None:
                usage = event["usage"]
                continue
            choice = event["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            if hang_up and len(text) >= 3:
                break  # leaving the block closes the connection mid-stream
    return {"text": text, "finish": finish, "done": done, "usage": usage}


def test_half_the_clients_disconnect(server):
    before = scrape(server.url)

    async def main():
        limits = httpx.Limits(max_connections=NUM_CLIENTS + 5)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(_client(c, i, hang_up=i % 2 == 1)
                                          for i in range(NUM_CLIENTS)))

    results = asyncio.run(main())
    completed = results[0::2]
    assert all(r["done"] and r["finish"] == "length" for r in completed)
    assert all(r["usage"]["completion_tokens"] == FULL_TOKENS for r in completed)
    assert all(not r["done"] for r in results[1::2])

    deadline = time.monotonic() + 20
    while True:
        after = scrape(server.url)
        idle = (after["e3rl_requests_running"] == 0 and after["e3rl_requests_waiting"] == 0
                and after["e3rl_kv_cache_usage_ratio"] == 0.0
                and after["e3rl_kv_cache_free_blocks"] == after["e3rl_kv_cache_blocks"])
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle, after
    aborted = after["e3rl_requests_total{finish_reason=abort}"] \
        - before["e3rl_requests_total{finish_reason=abort}"]
    finished = after["e3rl_requests_total{finish_reason=length}"] \
        - before["e3rl_requests_total{finish_reason=length}"]
    assert (aborted, finished) == (NUM_CLIENTS // 2, NUM_CLIENTS // 2)
    # The aborted requests stopped early: far fewer tokens than 25 x 400 were generated.
    generated = after["e3rl_generation_tokens_total"] - before["e3rl_generation_tokens_total"]
    assert generated < NUM_CLIENTS // 2 * FULL_TOKENS + NUM_CLIENTS // 2 * 200


def test_non_streaming_client_that_disconnects_is_aborted(server):
    before = scrape(server.url)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=0.3) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 480,
                                                      "ignore_eos": True})

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = scrape(server.url)
        if after["e3rl_requests_running"] == 0 and after["e3rl_kv_cache_usage_ratio"] == 0:
            break
        time.sleep(0.05)
    assert after["e3rl_requests_total{finish_reason=abort}"] \
        == before["e3rl_requests_total{finish_reason=abort}"] + 1
    assert after["e3rl_kv_cache_usage_ratio"] == 0
