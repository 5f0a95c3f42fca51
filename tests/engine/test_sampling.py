"""Sampler semantics: seeds, top-k / top-p / min-p, stops, logprobs, NLL and entropy."""

import math

import pytest
import torch

from e3rl.engine import LLM, SamplingParams
from e3rl.engine.sampler import SamplingBatch, apply_top_k_top_p_min_p, sample


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, num_kv_blocks=256, block_size=4)


def _batch(n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None):
    gens = [torch.Generator().manual_seed(s) for s in (seeds or range(n))]
    return SamplingBatch(torch.full((n,), temperature), torch.full((n,), top_k),
                         torch.full((n,), top_p), torch.full((n,), min_p), gens, [[]] * n,
                         any_top_k=top_k > 0, any_top_p=top_p < 1, any_min_p=min_p > 0)


def test_top_k_top_p_min_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda b: torch.isfinite(apply_top_k_top_p_min_p(logits.clone(), b)).tolist()[0]
    assert kept(_batch(1, top_k=2)) == [True, True, False, False]
    assert kept(_batch(1, top_p=0.8)) == [True, True, False, False]
    assert kept(_batch(1, top_p=0.81)) == [True, True, True, False]
    assert kept(_batch(1, min_p=0.35)) == [True, True, False, False]


def test_sampler_nll_and_entropy_are_of_the_sampling_distribution():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    out = sample(logits.clone(), _batch(3, temperature=0.7))
    logp = (logits / 0.7).log_softmax(-1)
    for row in range(3):
        tok = int(out.token_ids[row])
        assert math.isclose(out.nll[row], -logp[row, tok], rel_tol=1e-5)
        assert math.isclose(out.entropy[row], -(logp[row].exp() * logp[row]).sum(), rel_tol=1e-5)
        assert math.isclose(out.logprobs[row], logits.log_softmax(-1)[row, tok], rel_tol=1e-5)


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(4000, 1)
    out = sample(logits, _batch(4000, seeds=range(4000)))
    freq = torch.bincount(out.token_ids, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_same_seed_same_tokens_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([[10, 11, 12]], params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.9, seed=s, max_tokens=30, ignore_eos=True)
              for s in range(5)]
    batch = llm.generate([[20, 21], [10, 11, 12], [7] * 9, [30, 31, 32, 33], [40], [50, 51]],
                         [others[0], params, *others[1:]])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = llm.generate([[10, 11, 12]], params.clone(seed=99))[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples_share_prompt_blocks_and_differ(llm):
    engine = llm.engine
    engine.add_request("shared", list(range(5, 23)), SamplingParams(
        n=4, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True))
    engine.step()  # prefill of the first sample, then the other three fork from it
    seqs = engine.requests["shared"].seqs
    full_blocks = 18 // 4
    first = seqs[0].block_table[:full_blocks]
    for seq in seqs[1:]:
        assert seq.block_table[:full_blocks] == first
    assert all(engine.block_manager.ref_counts[b] == 4 for b in first)
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    outs = llm.generate([list(range(5, 23))], SamplingParams(n=4, temperature=1.0, seed=3,
                                                             max_tokens=8, ignore_eos=True))
    token_lists = [o.token_ids for o in outs[0].outputs]
    assert len({tuple(t) for t in token_lists}) > 1


def test_stop_strings_and_stop_token_ids(llm):
    tok = llm.tokenizer
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate("abc", greedy)[0].outputs[0]
    text = full.text
    stop = text[5:7]
    first = text.find(stop)
    out = llm.generate("abc", greedy.clone(stop=[stop]))[0].outputs[0]
    assert out.text == text[:first] and out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate("abc", greedy.clone(stop=[stop], include_stop_str_in_output=True))[0]
    assert out.outputs[0].text == text[:first + len(stop)]
    stop_id = full.token_ids[4]
    out = llm.generate("abc", greedy.clone(stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    assert tok.decode(full.token_ids, skip_special_tokens=True) == text


def test_eos_stops_unless_ignored(llm):
    eos = llm.tokenizer.eos_token_id
    # Random tiny models rarely pick EOS: feed it to the stop check directly.
    engine = llm.engine
    engine.add_request("eos", [5, 6, 7], SamplingParams(temperature=0, max_tokens=5))
    seq = engine.requests["eos"].seqs[0]
    engine._check_stop(seq, eos, "")
    assert seq.finish_reason == "stop" and seq.stop_reason is None
    engine.abort("eos")
    engine.add_request("eos2", [5, 6, 7], SamplingParams(temperature=0, max_tokens=5,
                                                         ignore_eos=True))
    seq = engine.requests["eos2"].seqs[0]
    engine._check_stop(seq, eos, "")
    assert seq.finish_reason is None
    engine.abort("eos2")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_logprobs_nll_entropy_returned(llm):
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6,
                                                      ignore_eos=True, logprobs=3))[0]
    o = out.outputs[0]
    assert len(o.logprobs) == len(o.nll) == len(o.entropy) == len(o.top_logprobs) == 6
    for tok, lp, top, nll, ent in zip(o.token_ids, o.logprobs, o.top_logprobs, o.nll, o.entropy):
        assert tok in top and len(top) <= 4
        assert lp == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the top token
        assert nll == pytest.approx(-lp, abs=1e-5)  # greedy: raw distribution
        assert ent > 0


def test_prompt_logprobs_match_a_full_forward(llm, tiny_model):
    from transformers import AutoModelForCausalLM

    prompt = [5, 17, 9, 33, 40, 12, 8]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=0,
                                                prompt_logprobs=2))[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    logp = model(torch.tensor([prompt])).logits[0].log_softmax(-1)
    expected = [None] + [float(logp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert out.prompt_token_logprobs[0] is None
    assert out.prompt_token_logprobs[1:] == pytest.approx(expected[1:], abs=1e-4)
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"


def test_logprobs_zero_returns_only_the_sampled_token(llm):
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.5, seed=1, max_tokens=4,
                                                   ignore_eos=True, logprobs=0))[0].outputs[0]
    assert [list(t) for t in out.top_logprobs] == [[tok] for tok in out.token_ids]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_bans_stop_tokens_until_reached(llm, temperature):
    """The ban is applied to a copy of the step's logits (they are inference tensors: editing
    them in place crashed the engine loop), and the stop token cannot end the output early."""
    prompt = [5, 6, 7, 8]
    base = dict(temperature=temperature, seed=3, max_tokens=6, ignore_eos=True)
    first = llm.generate([prompt], SamplingParams(**base))[0].outputs[0].token_ids
    stop = first[0]  # the token the model picks first
    out = llm.generate([prompt], SamplingParams(**base, stop_token_ids=[stop], min_tokens=3))
    ids = out[0].outputs[0].token_ids
    assert len(ids) >= 3 and stop not in ids[:3]
    # without min_tokens the same request stops at once
    out = llm.generate([prompt], SamplingParams(**base, stop_token_ids=[stop]))
    assert out[0].outputs[0].token_ids == [stop] and out[0].outputs[0].finish_reason == "stop"
    assert llm.generate([prompt], SamplingParams(**base))[0].outputs[0].token_ids == first
