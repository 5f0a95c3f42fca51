"""Load and abuse against one real ``e3rl serve`` (engine core in its own process), the short
CI versions of benchmarks/reliability.py's attacks (which run them for minutes and print the
figures): overload past the queue, a storm of streaming clients hanging up during forced
erasures, clients that read slowly or never, a soak with feedback and weight uploads, and
fuzzing every route of the server's own OpenAPI document.

The server has few slots (4 running, 4 waiting), a small KV pool (256 blocks) and a short
context (128), so that every attack reaches its limits within seconds on two cores. Each test
ends with the engine idle: nothing running or waiting, every KV block free (/metrics)."""

from __future__ import annotations

import asyncio
import signal
import socket

import httpx
import pytest

from e3rl.engine.model_factory import build_tiny_model

from benchmarks.reliability import (engine_state, open_request, run_fuzz, run_overload,
                                    run_slow, run_soak, run_storm, serve, wait_idle)

API_KEY, ADMIN_KEY = "api-key-load", "admin-key-load"
API = {"Authorization": f"Bearer {API_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
NUM_SEQS = NUM_WAITING = 4


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """(process, url): one server for the whole module, with both keys and uploads on."""
    root = tmp_path_factory.mktemp("load")
    (root / "ckpts").mkdir()
    proc, url = serve(tiny_model, str(root), "--api-key", API_KEY, "--admin-key", ADMIN_KEY,
                      "--checkpoint-dir", str(root / "ckpts"), "--max-num-seqs",
                      str(NUM_SEQS), "--max-waiting", str(NUM_WAITING), "--max-model-len",
                      "128", "--num-kv-blocks", "256", timeout_s=180)
    yield proc, url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, (root / "serve.log").read_text()[-3000:]


def assert_idle(state: dict) -> None:
    assert state["is_idle"] and state["blocks_leaked"] == 0, state


def test_overload_refuses_the_excess_with_503_and_finishes_the_admitted(server):
    proc, url = server
    clients = 4 * (NUM_SEQS + NUM_WAITING)
    # Each admitted request holds its slot for 64 tokens, so 32 clients overload 8 places
    # however fast the engine decodes (with 16 tokens a faster engine drained the queue
    # between arrivals often enough to refuse only 16% of them).
    r = asyncio.run(run_overload(url, proc.pid, clients, duration_s=4, max_tokens=64,
                                 headers=API))
    print(r)
    assert r["num_problems"] == 0, r["problems"]  # only 200s and 503 queue_full + Retry-After
    assert r["admitted"] > 0 and r["share_503"] > 0.2, r
    assert set(r["status_counts"]) == {"200", "503"}, r
    assert r["rss_peak_mib"] - r["rss_before_mib"] < 200, r
    assert_idle(r["engine_after"])


def test_disconnect_storm_leaks_no_block_and_counts_every_abort(server):
    _, url = server
    r = asyncio.run(run_storm(url, 40, max_tokens=32, seed=1, headers=API, time_limit_s=60))
    print(r)
    assert not r["client_exceptions"] and not r["other_status"], r
    assert r["erasures"] > 0 and r["server_aborted"] > 0 and r["completed"] > 0, r
    assert r["counters_consistent"], r
    assert_idle(r["engine_after"])


def test_slow_readers_cost_other_clients_nothing_and_are_not_buffered_without_bound(server):
    proc, url = server
    r = asyncio.run(run_slow(url, proc.pid, num_slow=2, num_fast=2, phase_s=2,
                             slow_max_tokens=100, fast_max_tokens=32, headers=API, n=2))
    print(r)
    assert r["slow_generations_done"], r
    # Other processes share the two cores: a loose bound (a stall would be ~0).
    assert r["throughput_ratio"] > 0.4, r
    assert r["never_read_cut_by_server"] == 0, r  # 2 x 100 tokens: far under the cap
    assert r["unread_mib"] > 0.1, r
    assert r["rss_holding_mib"] - r["rss_before_mib"] < 32 + 4 * r["unread_mib"], r
    assert_idle(r["engine_after"])


def test_soak_with_feedback_and_weight_uploads_stays_flat(server, tmp_path):
    proc, url = server
    other = build_tiny_model(tmp_path / "other", "qwen3", seed=2)
    blobs = [(other / "model.safetensors").read_bytes()]
    r = asyncio.run(run_soak(url, proc.pid, duration_s=8, swap_every_s=2.5, checkpoints=blobs,
                             api_headers=API, admin_headers=ADMIN, warmup_s=3))
    print({k: v for k, v in r.items() if k != "samples"})
    assert r["errors"] == 0, r["error_examples"]
    assert r["swaps"] >= 2 and r["feedback"] > 0, r
    assert r["fd_drift"] <= 2 and r["thread_drift"] <= 2 and r["rss_drift_mib"] < 32, r
    assert_idle(r["engine_after"])


def test_fuzz_every_route_with_and_without_keys(server):
    _, url = server
    r = run_fuzz(url, API_KEY, ADMIN_KEY, num_cases=200, time_limit_s=15, seed=1,
                 big_bytes=100_000)
    print({k: v for k, v in r.items() if k != "examples"})
    assert r["operations"] >= 16, r
    assert r["server_errors"] == 0 and r["bad_error_shape"] == 0, r["examples"]
    assert "transport_errors" not in r, r["examples"]
    assert r["cases"] >= 100 and r["normal_request_after"] == 200, r
    assert_idle(wait_idle(url))


def test_a_stream_nobody_reads_is_aborted_past_the_unsent_cap(tiny_model, engine, monkeypatch):
    """Regression: the output of a stream whose client never read waited in the server
    without bound (n=64 x 4,096 tokens with log-probs: hundreds of MB for one connection).
    Past MAX_UNSENT_TOKENS the request is aborted and the connection closed."""
    from e3rl.server import serving
    from e3rl.server.app import create_app

    from tests.server.conftest import LiveServer, make_settings
    from tests.server.test_disconnect import scrape

    monkeypatch.setattr(serving, "MAX_UNSENT_TOKENS", 64)
    live = LiveServer(create_app(make_settings(tiny_model), engine=engine))
    # Small kernel buffers (accepted sockets inherit them): the unread output backs up into
    # the server process at once, rather than after the several MB loopback can buffer.
    live.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    try:
        before = scrape(live.url)["e3rl_requests_total{finish_reason=abort}"]

        async def never_read() -> bytes:
            body = {"prompt": "x", "stream": True, "max_tokens": 120, "n": 16, "logprobs": 5,
                    "ignore_eos": True, "temperature": 1.0}
            reader, writer = await open_request(live.url, "/v1/completions", body, {},
                                                rcvbuf=4096)
            # Nothing is read until the request has run and ended (cut, or all generated).
            for _ in range(200):
                if (await asyncio.to_thread(engine_state, live.url))["running"] > 0:
                    break
                await asyncio.sleep(0.05)
            assert (await asyncio.to_thread(wait_idle, live.url, 120.0))["is_idle"]
            data = await asyncio.wait_for(reader.read(), 30)  # then read it all: to EOF
            writer.close()
            return data

        data = asyncio.run(never_read())
        assert data.startswith(b"HTTP/1.1 200") and b"data: [DONE]" not in data
        assert_idle(wait_idle(live.url))
        assert scrape(live.url)["e3rl_requests_total{finish_reason=abort}"] > before
    finally:
        live.stop()


def test_a_backlog_is_written_in_bounded_batches(monkeypatch):
    """Regression: a stream's consumer took everything queued into one write, so a slow
    reader's whole backlog (15,000 tokens with log-probs) was rendered at once on the event
    loop (other streams fell from 419 to 8 tok/s in benchmarks/reliability.py slow) and moved
    into the socket's buffer, out of sight of MAX_UNSENT_TOKENS."""
    from unittest.mock import MagicMock

    from e3rl.engine import SamplingParams
    from e3rl.engine.outputs import CompletionOutput, RequestOutput
    from e3rl.server import serving

    num_deltas = 1000
    monkeypatch.setattr(serving, "MAX_BATCH_TOKENS", 100)

    class Engine:
        async def generate(self, request_id, prompt, params, **kwargs):
            for k in range(num_deltas):
                yield RequestOutput(request_id, "p", [1], [CompletionOutput(
                    0, "x", [7], "length" if k == num_deltas - 1 else None)],
                    finished=k == num_deltas - 1)

    async def main() -> list[int]:
        gen = serving.Generation(Engine(), MagicMock(), [serving.EngineRequest(
            "r", "p", [1], SamplingParams(max_tokens=num_deltas))])
        gen.start()
        await gen.prime()
        await asyncio.sleep(0.1)  # the pump queues the whole backlog meanwhile
        return [sum(len(o.token_ids) for _, d in batch for o in d.outputs)
                async for batch in gen.delta_batches()]

    sizes = asyncio.run(main())
    assert sum(sizes) == num_deltas and max(sizes) == 100, sizes


def test_more_samples_than_the_engine_runs_at_once_is_a_400(server):
    """best_of 7 against --max-num-seqs 4 used to wait forever (a fuzz finding): refused."""
    _, url = server
    for body in ({"prompt": "result", "best_of": 7}, {"prompt": "result", "n": 5}):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=API, timeout=30)
        assert r.status_code == 400, r.text
        assert "max_num_seqs (4)" in r.json()["error"]["message"], r.text
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "result", "n": 4, "max_tokens": 2},
                   headers=API, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text


def test_serving_benchmark_load_generator_gets_the_same_streams_with_both_clients(server):
    """benchmarks/serving.py's load generator (aiohttp by default, httpx as before) against a
    live server: every greedy stream is read to its end with the requested token count, and
    both clients read the same texts."""
    from benchmarks.serving import run_load

    proc, url = server
    prompts = [[5 + i, 6, 7, 8, 9] for i in range(5)]
    lens = [3, 7, 2, 5, 4]
    results = {kind: asyncio.run(run_load(url, prompts, lens, 2, kind, headers=API))[1]
               for kind in ("aiohttp", "httpx")}
    for kind, stats in results.items():
        assert [s.num_tokens for s in stats] == lens, kind
        assert all(s.num_chunks >= 1 and s.ttft_s > 0 and s.text for s in stats), kind
    assert [s.text for s in results["aiohttp"]] == [s.text for s in results["httpx"]]
    assert_idle(wait_idle(url))
