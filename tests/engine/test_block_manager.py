"""Block manager bookkeeping, and the engine-level no-leak property."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e3rl.engine import LLM, SamplingParams
from e3rl.engine.block_manager import BlockManager


def test_truncate_frees_exactly_the_blocks_past_the_cut():
    bm = BlockManager(num_blocks=10, block_size=4)
    table: list[int] = []
    bm.prepare_write(table, 0, 14)  # 4 blocks
    assert len(table) == 4 and bm.num_free_blocks == 6
    kept = table[:2]
    released = bm.truncate(table, 8)
    assert table == kept and len(released) == 2 and bm.num_free_blocks == 8
    bm.truncate(table, 5)  # still 2 blocks needed for 5 tokens
    assert table == kept
    bm.free(table)
    assert table == [] and bm.num_free_blocks == 10
    bm.check_invariants()


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent: list[int] = []
    bm.prepare_write(parent, 0, 6)  # 2 blocks, the second partial
    child = bm.fork(parent)
    assert child == parent and all(bm.ref_counts[b] == 2 for b in parent)
    copies = bm.prepare_write(child, 6, 7)  # writes into the shared partial block
    assert copies == [(parent[1], child[1])] and child[0] == parent[0]
    assert bm.ref_counts[parent[0]] == 2 and bm.ref_counts[parent[1]] == 1
    assert bm.prepare_write(parent, 6, 7) == []  # parent's block is its own again
    bm.free(child)
    bm.free(parent)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_prepare_write_refuses_without_blocks():
    bm = BlockManager(num_blocks=2, block_size=4)
    table: list[int] = []
    assert not bm.can_write(table, 0, 9)
    with pytest.raises(RuntimeError):
        bm.prepare_write(table, 0, 9)
    assert table == [] and bm.num_free_blocks == 2


ops = st.lists(st.tuples(st.sampled_from(["write", "truncate", "fork", "free"]),
                         st.integers(0, 7), st.integers(0, 40)), max_size=60)


@given(ops)
def test_block_manager_random_operations_keep_invariants(operations):
    bm = BlockManager(num_blocks=12, block_size=4)
    tables: list[list[int]] = [[] for _ in range(8)]
    lengths = [0] * 8
    for op, i, n in operations:
        if op == "write" and bm.can_write(tables[i], lengths[i], lengths[i] + n):
            bm.prepare_write(tables[i], lengths[i], lengths[i] + n)
            lengths[i] += n
        elif op == "truncate":
            lengths[i] = min(lengths[i], n)
            bm.truncate(tables[i], lengths[i])
        elif op == "fork":
            j = (i + 1) % 8
            bm.free(tables[j])
            tables[j], lengths[j] = bm.fork(tables[i]), lengths[i]
        elif op == "free":
            bm.free(tables[i])
            lengths[i] = 0
        bm.check_invariants()
        assert sum(1 for c in bm.ref_counts if c) == bm.num_used_blocks
    for table in tables:
        bm.free(table)
    assert bm.num_free_blocks == 12
    bm.check_invariants()


@pytest.fixture(scope="module")
def small_llm(tiny_model):
    return LLM(tiny_model, num_kv_blocks=24, block_size=4, max_num_seqs=6)


engine_ops = st.lists(
    st.tuples(st.sampled_from(["add", "add", "abort", "step", "step", "truncate"]),
              st.integers(0, 9), st.integers(1, 20)),
    min_size=1, max_size=40)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(engine_ops)
def test_engine_never_leaks_blocks(small_llm, operations):
    """Any mix of finished, aborted, truncated and preempted requests returns every block."""
    run_engine_ops(small_llm.engine, operations)


def run_engine_ops(engine, operations):
    """Apply ``operations`` to the engine, checking the block invariants after each one and
    that every block is usable again at the end (also run with prefix caching on)."""
    live: list[str] = []
    for k, (op, i, n) in enumerate(operations):
        if op == "add":
            rid = f"p{k}"
            params = SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True,
                                    n=1 + i % 3)
            engine.add_request(rid, list(range(5, 5 + 3 * n)), params)
            live.append(rid)
        elif op == "abort" and live:
            engine.abort(live.pop(i % len(live)))
        elif op == "truncate" and engine.scheduler.running:
            seq = engine.scheduler.running[i % len(engine.scheduler.running)]
            engine.scheduler.truncate(seq, min(seq.num_output_tokens, n % 4))
        else:
            engine.step()
        engine.block_manager.check_invariants()
        used = sum(len(s.block_table) for s in engine.scheduler.running)
        assert engine.block_manager.num_used_blocks <= used
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting
    engine.block_manager.check_invariants()
