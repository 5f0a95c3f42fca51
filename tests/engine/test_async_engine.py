"""The online API: concurrent streams, aborts by closing the stream, queue bound."""

import asyncio

import pytest

from e3rl.engine import EngineConfig, LLM, QueueFull, SamplingParams
from e3rl.engine.async_engine import AsyncEngine
from e3rl.engine.outputs import merge_delta


@pytest.fixture()
def engine(tiny_model):
    eng = AsyncEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=24, block_size=4,
                                   max_waiting=8))
    eng.start()
    yield eng
    eng.shutdown()


async def _collect(eng, rid, prompt, params, stop_after=None):
    acc, agen = None, eng.generate(rid, prompt, params)
    async for delta in agen:
        acc = merge_delta(acc, delta)
        if stop_after is not None and len(acc.outputs[0].token_ids) >= stop_after:
            await agen.aclose()
            break
    return acc


def test_streams_equal_offline_and_aborts_free_blocks(engine, tiny_model):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(8)]

    async def main():
        tasks = [_collect(engine, f"r{i}", p, params, stop_after=3 if i % 2 else None)
                 for i, p in enumerate(prompts)]
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    ref = LLM(tiny_model, num_kv_blocks=64).generate(prompts, params)
    for i, (got, want) in enumerate(zip(results, ref)):
        if i % 2 == 0:
            assert got.outputs[0].token_ids == want.outputs[0].token_ids
            assert got.outputs[0].text == want.outputs[0].text
    assert engine.call(lambda e: e.block_manager.num_free_blocks).result(10) == 24
    stats = engine.call(lambda e: e.stats()).result(10)
    assert stats.num_running_seqs == 0 and stats.num_waiting_seqs == 0


def test_queue_full_is_refused(tiny_model):
    eng = AsyncEngine(EngineConfig(model=str(tiny_model), num_kv_blocks=24, block_size=4,
                                   max_waiting=1))
    # Not started: submitted requests stay queued, so the second one finds the queue full.
    eng._thread = type("T", (), {"is_alive": lambda self: True})()

    async def main():
        first = eng.generate("a", [5, 6], SamplingParams(max_tokens=2))
        task = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await eng.generate("b", [5, 6], SamplingParams(max_tokens=2)).__anext__()
        task.cancel()

    asyncio.run(main())


POISON = 99  # a prompt starting with this token makes the model step raise


def _poison_steps(eng, always=False):
    """Make the engine's model step raise when a poisoned prompt is scheduled (or always)."""
    runner = eng.engine.runner
    execute = runner.execute

    def failing(sched):
        if always or any(item.seq.token_ids[0] == POISON for item in sched.scheduled):
            raise RuntimeError("injected step failure")
        return execute(sched)

    runner.execute = failing


def test_a_failing_step_aborts_its_requests_and_the_engine_serves_on(engine, tiny_model):
    from e3rl.engine import StepFailed

    _poison_steps(engine)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def main():
        with pytest.raises(StepFailed, match="RuntimeError"):
            await _collect(engine, "bad", [POISON, 6, 7], params)
        return await _collect(engine, "good", [5, 6, 7], params)

    good = asyncio.run(main())
    ref = LLM(tiny_model, num_kv_blocks=64).generate([[5, 6, 7]], params)[0]
    assert good.outputs[0].token_ids == ref.outputs[0].token_ids
    assert engine.is_alive and engine.num_step_failures == 0
    assert engine.call(lambda e: e.block_manager.num_free_blocks).result(10) == 24
    assert engine.call(lambda e: len(e.requests)).result(10) == 0


def test_repeated_step_failures_stop_the_engine(engine):
    from e3rl.engine import EngineDead, StepFailed
    from e3rl.engine.async_engine import MAX_CONSECUTIVE_STEP_FAILURES

    _poison_steps(engine, always=True)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        for i in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
            with pytest.raises(StepFailed):
                await _collect(engine, f"r{i}", [5, 6, 7], params)
        with pytest.raises(EngineDead, match="crashed"):
            await _collect(engine, "last", [5, 6, 7], params)

    asyncio.run(main())
    assert not engine.is_alive
