"""The CUDA path: greedy outputs on the GPU equal HF generate on the GPU (skipped without one)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from e3rl.engine import LLM, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("num_blocks", [128, 16])
def test_greedy_on_cuda_matches_hf(tiny_model_dirs, arch, num_blocks):
    path = tiny_model_dirs[arch]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 100, (n,), generator=g).tolist() for n in [3, 17, 9, 1, 30]]
    llm = LLM(path, device="cuda", num_kv_blocks=num_blocks, block_size=4)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).cuda()
    hf.generation_config.eos_token_id = None
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref
    assert llm.engine.block_manager.num_free_blocks == num_blocks
    if num_blocks == 16:
        assert llm.engine.scheduler.num_preemptions > 0
