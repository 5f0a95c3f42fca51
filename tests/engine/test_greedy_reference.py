"""Greedy outputs equal Hugging Face generate, token for token, for every tiny architecture."""

import pytest
import torch

from e3rl.engine import LLM, SamplingParams
from tests.conftest import ARCHS, hf_greedy

PROMPT_LENGTHS = [3, 17, 9, 1, 30, 5, 12, 24]
MAX_TOKENS = 24


def _prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 100, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def references(tiny_model_dirs):
    prompts = _prompts()
    return prompts, {arch: hf_greedy(tiny_model_dirs[arch], prompts, MAX_TOKENS) for arch in ARCHS}


@pytest.mark.parametrize("backend", ["native", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_matches_hf_generate(arch, backend, tiny_model_dirs, references):
    prompts, refs = references
    llm = LLM(tiny_model_dirs[arch], num_kv_blocks=128, block_size=4, attention_backend=backend)
    assert llm.engine.runner.attention_backend == backend
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs[arch]
    assert llm.engine.scheduler.num_preemptions == 0
    assert llm.engine.block_manager.num_free_blocks == 128


@pytest.mark.parametrize("backend", ["native", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_matches_hf_under_preemption(arch, backend, tiny_model_dirs, references):
    prompts, refs = references
    # 16 blocks of 4 tokens: the 8 requests need ~300 token slots, so sequences are
    # preempted and recomputed.
    llm = LLM(tiny_model_dirs[arch], num_kv_blocks=16, block_size=4, attention_backend=backend)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True))
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == refs[arch]
    assert llm.engine.block_manager.num_free_blocks == 16


def test_greedy_matches_hf_with_chunked_prefill(tiny_model_dirs, references):
    prompts, refs = references
    # A step budget of 7 tokens forces prompts to be prefilled in chunks over cached prefixes.
    llm = LLM(tiny_model_dirs["qwen3"], num_kv_blocks=128, block_size=4,
              max_num_batched_tokens=7)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == refs["qwen3"]


def test_string_prompt_matches_hf(tiny_model):
    llm = LLM(tiny_model, num_kv_blocks=64)
    tok = llm.tokenizer
    out = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=12,
                                                             ignore_eos=True))[0]
    ids = tok("The quick brown fox")["input_ids"]
    assert out.prompt_token_ids == ids
    ref = hf_greedy(tiny_model, [ids], 12)[0]
    assert out.outputs[0].token_ids == ref
    assert out.outputs[0].text == tok.decode(ref, skip_special_tokens=True)
