"""The engine core in a process of its own (``EngineCoreClient``): the same outputs as the
engine in process, aborts, weight swaps and errors across the transport, and a dead core
noticed (never a hang)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from e3rl.engine import LLM, EngineConfig, SamplingParams, WeightUpdateError
from e3rl.engine.core_client import EngineCoreClient
from e3rl.engine.errors import EngineDead, EngineStartError, InvalidRequest
from e3rl.engine.model_factory import build_tiny_model

from tests.conftest import hf_greedy
from tests.engine.test_async_engine import _collect

CONFIG = dict(dtype="float32", num_kv_blocks=48, block_size=4, max_waiting=8, num_threads=1)


@pytest.fixture(scope="module")
def core(tiny_model):
    client = EngineCoreClient(EngineConfig(model=str(tiny_model), **CONFIG))
    client.start()
    yield client
    client.shutdown()


def _until(condition, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_greedy_streams_equal_hf_and_aborts_free_every_block(core, tiny_model):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(6)]

    async def main():
        return await asyncio.gather(*[
            _collect(core, f"g{i}", p, params, stop_after=3 if i % 2 else None)
            for i, p in enumerate(prompts)])

    results = asyncio.run(main())
    want = hf_greedy(tiny_model, prompts, 12)
    offline = LLM(tiny_model, **CONFIG).generate(prompts, params)
    for i, got in enumerate(results):
        if i % 2 == 0:  # finished: exactly HF's tokens, and the in-process engine's outputs
            assert got.outputs[0].token_ids == want[i]
            assert got.outputs[0].text == offline[i].outputs[0].text
            assert got.outputs[0].logprobs == pytest.approx(offline[i].outputs[0].logprobs,
                                                            abs=1e-5)
            assert got.outputs[0].top_logprobs[0].keys() == \
                offline[i].outputs[0].top_logprobs[0].keys()
        else:  # closed early: aborted in the core
            assert len(got.outputs[0].token_ids) >= 3
    _until(lambda: core.latest_stats.num_free_kv_blocks == CONFIG["num_kv_blocks"]
           and core.latest_stats.num_running_requests == 0
           and core.latest_stats.num_waiting_requests == 0)
    assert core._prompts == {}  # the front end's copy of each prompt went with its request


def test_text_prompts_and_invalid_requests(core):
    async def main():
        acc = await _collect(core, "t", "hello", SamplingParams(max_tokens=3))
        assert acc.prompt == "hello" and acc.outputs[0].finish_reason == "length"
        with pytest.raises(InvalidRequest, match="outside the vocabulary"):
            await _collect(core, "bad", [10**6], SamplingParams(max_tokens=3))
        with pytest.raises(InvalidRequest, match="context length"):
            await _collect(core, "long", [5] * 10, SamplingParams(max_tokens=10**6))
    asyncio.run(main())


def test_a_weight_swap_crosses_and_a_refused_one_changes_nothing(core, tiny_model,
                                                                  tmp_path):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = [5, 6, 7, 8]
    new = build_tiny_model(tmp_path / "new", "qwen3", seed=3)
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(str(new / "model.safetensors"))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(bad / "model.safetensors"))

    async def main():
        before = await _collect(core, "b", prompt, params)
        with pytest.raises(WeightUpdateError, match="missing 1 tensor"):
            await core.update_weights(bad, "bad")
        assert core.latest_stats.weight_version == "0"
        result = await core.update_weights(new, "1")
        assert result.version == "1" and result.num_tensors == len(tensors) + 1
        assert core.latest_stats.weight_version == "1"  # at once, not after a step
        after = await _collect(core, "a", prompt, params)
        restored = await core.update_weights(tiny_model / "model.safetensors", "2")
        assert restored.num_tensors >= 1
        again = await _collect(core, "c", prompt, params)
        return before, after, again

    before, after, again = asyncio.run(main())
    assert after.outputs[0].token_ids == hf_greedy(new, [prompt], 8)[0]
    assert after.weight_version == "1" and again.weight_version == "2"
    assert again.outputs[0].token_ids == before.outputs[0].token_ids


def test_a_killed_core_fails_its_requests_and_reports_dead(tiny_model):
    client = EngineCoreClient(EngineConfig(model=str(tiny_model), **CONFIG))
    client.start()
    try:
        async def main():
            stream = client.generate("r", [5, 6, 7], SamplingParams(max_tokens=180,
                                                                    ignore_eos=True))
            await stream.__anext__()  # running in the core
            os.kill(client.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(EngineDead, match="exit code -9"):
                async for _ in stream:
                    pass
            assert time.monotonic() - t0 < 5
            with pytest.raises(EngineDead):
                await client.generate("next", [5], SamplingParams(max_tokens=1)).__anext__()
            with pytest.raises(EngineDead):
                await client.update_weights(tiny_model, "x")
        asyncio.run(main())
        assert not client.is_alive and "exit code -9" in str(client.error)
    finally:
        client.shutdown()


def test_a_core_that_cannot_start_says_why(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(EngineStartError, match="the engine failed to start: .*no-such"):
        EngineCoreClient(EngineConfig(model=str(tmp_path), **CONFIG))


def test_the_core_exits_when_its_front_end_is_killed(tiny_model, tmp_path):
    (tmp_path / "sockets").mkdir()
    script = (f"import sys, time\n"
              f"from e3rl.engine import EngineConfig\n"
              f"from e3rl.engine.core_client import EngineCoreClient\n"
              f"c = EngineCoreClient(EngineConfig(model={str(tiny_model)!r}, num_threads=1))\n"
              f"print(c.pid, flush=True)\n"
              f"time.sleep(600)\n")
    front = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             text=True, cwd=tmp_path,
                             env={**os.environ, "TMPDIR": str(tmp_path / "sockets")})
    try:
        core_pid = int(front.stdout.readline())
        assert len(list((tmp_path / "sockets").iterdir())) == 1
        front.kill()
        front.wait(10)
        deadline = time.monotonic() + 10
        while _exists(core_pid):
            assert time.monotonic() < deadline, "the orphaned engine core is still running"
            time.sleep(0.05)
        assert list((tmp_path / "sockets").iterdir()) == []  # it removed its sockets, config
    finally:
        front.kill()


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
