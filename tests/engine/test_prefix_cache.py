"""Automatic prefix caching: same outputs as without it, hits skip compute, no stale block
after a weight swap, LRU eviction, healing truncates keep the cache exact, no leaks."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from transformers import AutoModelForCausalLM

from e3rl.engine import LLM, SamplingParams
from e3rl.engine.block_manager import BlockManager
from e3rl.engine.model_factory import build_tiny_model
from tests.engine.test_block_manager import engine_ops, run_engine_ops
from tests.conftest import hf_logprobs
from tests.engine.test_healing import FORCE

BS = 4
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompts(seed=0, prefix_len=37, n=4):
    rng = random.Random(seed)
    prefix = [rng.randrange(5, 100) for _ in range(prefix_len)]
    return prefix, [prefix + [rng.randrange(5, 100) for _ in range(3 + i)] for i in range(n)]


@pytest.fixture(scope="module")
def llms(tiny_model):
    on = LLM(tiny_model, num_kv_blocks=128, block_size=BS, enable_prefix_caching=True)
    off = LLM(tiny_model, num_kv_blocks=128, block_size=BS, enable_prefix_caching=False)
    return on, off


def _ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_greedy_outputs_equal_with_and_without_caching(llms):
    on, off = llms
    prefix, prompts = _prompts()
    rounds = [prompts[:2], prompts[2:], prompts, [prefix], [prefix[:-1]], [prompts[0]]]
    for batch in rounds:  # later rounds hit blocks cached by earlier ones
        assert _ids(on.generate(batch, GREEDY)) == _ids(off.generate(batch, GREEDY))
    sampled = SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=10, ignore_eos=True)
    for _ in range(2):
        assert _ids(on.generate(prompts, sampled)) == _ids(off.generate(prompts, sampled))
    stats = on.engine.stats()
    assert stats.prefix_cache_hit_tokens > 0
    assert stats.prefix_cache_queried_tokens >= stats.prefix_cache_hit_tokens
    assert off.engine.stats().prefix_cache_hit_tokens == 0
    for llm in llms:
        bm = llm.engine.block_manager
        bm.check_invariants()
        assert bm.num_free_blocks == bm.num_blocks


def test_whole_prompt_cached_still_samples_its_last_token(llms):
    on, off = llms
    prompt = list(range(60, 60 + 4 * BS))  # a multiple of the block size
    first = on.generate([prompt], GREEDY)
    engine = on.engine
    engine.add_request("again", prompt, GREEDY)
    seq = engine.requests["again"].seqs[0]
    engine.step()
    # Every full block but the last one is a hit: the last token is fed (its logits sampled).
    assert seq.num_model_tokens == BS and seq.num_output_tokens == 1
    while engine.has_unfinished_requests():
        engine.step()
    assert seq.output_token_ids == first[0].outputs[0].token_ids
    assert seq.output_token_ids == off.generate([prompt], GREEDY)[0].outputs[0].token_ids


def test_a_hit_skips_the_cached_tokens(llms):
    on, _ = llms
    prefix, prompts = _prompts(seed=1, prefix_len=40)
    engine = on.engine
    on.generate([prompts[0]], GREEDY)
    hits = engine.stats().prefix_cache_hit_tokens
    engine.add_request("hit", prompts[1], GREEDY)
    seq = engine.requests["hit"].seqs[0]
    engine.step()
    cached = (len(prefix) // BS) * BS
    assert seq.num_model_tokens == len(prompts[1]) - cached
    assert engine.stats().prefix_cache_hit_tokens - hits == cached
    while engine.has_unfinished_requests():
        engine.step()


def test_prompt_logprobs_requests_do_not_use_the_cache(llms):
    on, off = llms
    _, prompts = _prompts(seed=2)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2)
    on.generate(prompts[:1], params)
    a, b = on.generate(prompts[1:2], params)[0], off.generate(prompts[1:2], params)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == len(prompts[1])


@pytest.fixture(scope="module")
def swap_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix_swap")
    return (build_tiny_model(root / "old", "llama", seed=1),
            build_tiny_model(root / "new", "llama", seed=2))


def test_weight_swap_never_hits_an_old_block(swap_models):
    old, new = swap_models
    llm = LLM(old, num_kv_blocks=64, block_size=BS, enable_prefix_caching=True)
    _, prompts = _prompts(seed=3)
    llm.generate(prompts[:2], GREEDY)
    engine = llm.engine
    assert engine.block_manager.cached
    llm.update_weights(new, "v2")
    assert not engine.block_manager.cached and not engine.block_manager.evictable
    engine.add_request("after", prompts[2], GREEDY)
    seq = engine.requests["after"].seqs[0]
    hits = engine.stats().prefix_cache_hit_tokens
    engine.step()
    assert seq.num_model_tokens == len(prompts[2])  # recomputed, nothing old reused
    assert engine.stats().prefix_cache_hit_tokens == hits
    while engine.has_unfinished_requests():
        engine.step()
    fresh = LLM(new, num_kv_blocks=64, block_size=BS, enable_prefix_caching=False)
    assert seq.output_token_ids == fresh.generate([prompts[2]], GREEDY)[0].outputs[0].token_ids
    # New-version blocks are cached and hit again.
    again = llm.generate(prompts[2:4], GREEDY)
    assert _ids(again) == _ids(fresh.generate(prompts[2:4], GREEDY))
    assert engine.stats().prefix_cache_hit_tokens > hits
    engine.block_manager.check_invariants()


def test_lru_eviction_under_a_small_pool(tiny_model):
    kw = dict(num_kv_blocks=24, block_size=BS, max_num_seqs=3)
    on = LLM(tiny_model, enable_prefix_caching=True, **kw)
    off = LLM(tiny_model, enable_prefix_caching=False, **kw)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    for seed in range(4):  # each round's prefix pushes older ones out
        _, prompts = _prompts(seed=10 + seed, prefix_len=30, n=3)
        for batch in (prompts, prompts[:1]):
            assert _ids(on.generate(batch, params)) == _ids(off.generate(batch, params))
            on.engine.block_manager.check_invariants()
    bm = on.engine.block_manager
    assert bm.num_evictions > 0 and on.engine.stats().prefix_cache_hit_tokens > 0
    assert bm.num_free_blocks == bm.num_blocks


def test_forced_healing_with_caching_keeps_kv_exact(tiny_model):
    """Forced erasures truncate into cached blocks; every returned token's log-prob still
    equals a from-scratch forward, in a first round (no hits: same tokens as caching off) and
    in a second one that hits blocks the first cached (some written around heals).

    The second round is not compared token for token with caching off: a hit prompt is
    prefilled from its first uncached token (the chunked-prefill attention path), whose
    float rounding differs (~5e-7) from a whole-prompt prefill, and forced healing's
    restore of the lowest-score attempt among near-ties can then pick another attempt."""
    kw = dict(num_kv_blocks=96, block_size=BS)
    on = LLM(tiny_model, enable_prefix_caching=True, **kw)
    off = LLM(tiny_model, enable_prefix_caching=False, **kw)
    _, prompts = _prompts(seed=4, prefix_len=21)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True,
                            healing=FORCE)
    first = on.generate(prompts, params)
    assert _ids(first) == _ids(off.generate(prompts, params))
    hits = on.engine.stats().prefix_cache_hit_tokens
    second = on.generate(prompts, params)
    assert on.engine.stats().prefix_cache_hit_tokens > hits
    model = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    erasures = 0
    for out in first + second:
        o = out.outputs[0]
        erasures += len(o.erasures)
        expected = hf_logprobs(model, out.prompt_token_ids, o.token_ids)
        assert o.logprobs == pytest.approx(expected, abs=2e-4)
    assert erasures >= 4
    bm = on.engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and bm.cached


def test_truncate_into_a_cached_block_unindexes_or_copies_it():
    bm = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    ids = list(range(10, 22))  # 3 full blocks
    table, hashes = [], []
    bm.prepare_write(table, 0, 12)
    bm.cache_full_blocks(ids, table, hashes, 12)
    assert len(bm.cached) == 3
    # Sole user: the cut block (index 1, cut at 6) leaves the index, block 2 stays cached.
    bm.truncate(table, 6)
    assert bm.block_hash[table[1]] is None and bm.block_hash[table[0]] is not None
    assert len(bm.cached) == 2 and len(bm.evictable) == 1
    assert bm.prepare_write(table, 6, 8) == []  # written in place: it is not indexed
    bm.check_invariants()
    # Shared: two sequences hit the cached blocks, one cuts inside the shared block 0.
    bm.free(table)
    table2, hashes2, other, other_hashes = [], [], [], []
    assert bm.allocate_cached_prefix(ids + [1], table2, hashes2) == 4  # block 1 was un-indexed
    assert bm.allocate_cached_prefix(ids + [1], other, other_hashes) == 4
    bm.truncate(other, 2)
    assert bm.block_hash[other[0]] is not None  # still shared by table2: kept indexed
    copies = bm.prepare_write(other, 2, 4)
    assert len(copies) == 1 and other[0] != table2[0] and bm.block_hash[other[0]] is None
    bm.check_invariants()
    bm.free(table2)
    bm.free(other)
    # An indexed block written again after its sharers left is copied too.
    t3, h3 = [], []
    assert bm.allocate_cached_prefix(ids + [1], t3, h3) == 4
    t4 = bm.fork(t3)
    bm.truncate(t3, 2)
    bm.free(t4)  # t3 is now block 0's only user, and block 0 is still indexed
    assert bm.ref_counts[t3[0]] == 1 and bm.block_hash[t3[0]] is not None
    assert len(bm.prepare_write(t3, 2, 3)) == 1 and bm.block_hash[t3[0]] is None
    bm.free(t3)
    bm.check_invariants()
    assert bm.num_free_blocks == 8


@pytest.fixture(scope="module")
def small_cached_llm(tiny_model):
    return LLM(tiny_model, num_kv_blocks=24, block_size=4, max_num_seqs=6,
               enable_prefix_caching=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(engine_ops)
def test_engine_never_leaks_blocks_with_prefix_caching(small_cached_llm, operations):
    run_engine_ops(small_cached_llm.engine, operations)
