"""truncate(seq, n) then decoding equals computing the shorter sequence from scratch."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from e3rl.engine import LLM, SamplingParams


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("keep", [0, 3, 8, 13])
def test_truncate_then_decode_matches_recompute(arch, keep, tiny_model_dirs):
    path = tiny_model_dirs[arch]
    llm = LLM(path, num_kv_blocks=64, block_size=4)
    engine = llm.engine
    prompt = [7, 30, 12, 55, 9, 41, 3 + keep]
    engine.add_request("r", prompt, SamplingParams(temperature=1.0, seed=5, max_tokens=40,
                                                   ignore_eos=True))
    other = [11, 12, 13]
    engine.add_request("other", other, SamplingParams(temperature=0, max_tokens=40,
                                                      ignore_eos=True))
    seq = engine.requests["r"].seqs[0]
    while seq.num_output_tokens < 18:
        engine.step()
    used_before = engine.block_manager.num_used_blocks
    engine.scheduler.truncate(seq, keep)
    kept = list(seq.token_ids)
    assert len(kept) == len(prompt) + keep
    assert len(seq.block_table) == -(-seq.num_computed_tokens // 4)
    assert engine.block_manager.num_used_blocks < used_before
    # The next step feeds exactly one token of this sequence: the last kept one.
    sched = engine.scheduler.schedule()
    item = next(s for s in sched.scheduled if s.seq is seq)
    assert item.num_new_tokens == 1 and item.seq.num_computed_tokens == len(kept) - 1
    run = engine.runner.execute(sched)
    i = sched.scheduled.index(item)
    logits = run.logits[run.sample_rows[i]]
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    with torch.no_grad():
        ref = model(torch.tensor([kept])).logits[0, -1]
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    engine.abort("r")
    engine.abort("other")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_greedy_continuation_after_truncate_matches_hf(tiny_model):
    llm = LLM(tiny_model, num_kv_blocks=64, block_size=4)
    engine = llm.engine
    prompt = [9, 8, 7, 6, 5]
    engine.add_request("g", prompt, SamplingParams(temperature=0, max_tokens=20,
                                                   ignore_eos=True))
    seq = engine.requests["g"].seqs[0]
    while seq.num_output_tokens < 12:
        engine.step()
    engine.scheduler.truncate(seq, 5)
    kept = list(seq.token_ids)
    while engine.has_unfinished_requests():
        engine.step()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    model.generation_config.eos_token_id = None
    ref = model.generate(torch.tensor([kept]), max_new_tokens=15, do_sample=False,
                         pad_token_id=0)[0].tolist()
    assert seq.token_ids == ref
