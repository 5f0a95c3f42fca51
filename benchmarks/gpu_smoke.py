"""CUDA path check: greedy outputs of the engine on the GPU equal HF generate on the GPU for
each tiny architecture (with preemption), healing invariants hold, and a throughput figure.

    python benchmarks/gpu_smoke.py
"""

import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

from e3rl.engine import LLM, SamplingParams
from e3rl.engine.model_factory import BENCH_QWEN3_100M, build_random_model, build_tiny_model


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.__version__, torch.cuda.get_device_name())
    root = tempfile.mkdtemp()
    failures = 0
    for arch in ["llama", "qwen3", "qwen2", "mistral"]:
        path = build_tiny_model(f"{root}/{arch}", arch, seed=1)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(4, 100, (n,), generator=g).tolist() for n in [3, 17, 9, 1, 30, 5, 12, 24]]
        for blocks in (128, 16):
            llm = LLM(path, device="cuda", num_kv_blocks=blocks, block_size=4)
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
            hf = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                      use_safetensors=True).cuda()
            hf.generation_config.eos_token_id = None
            same = 0
            for p, o in zip(prompts, outs):
                ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=24,
                                  do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                same += ref == o.outputs[0].token_ids
            ok = same == len(prompts) and llm.engine.block_manager.num_free_blocks == blocks
            failures += not ok
            print(f"{arch} blocks={blocks}: identical {same}/8, preemptions "
                  f"{llm.engine.scheduler.num_preemptions}, {'OK' if ok else 'FAIL'}")
    path = build_random_model(f"{root}/bench", BENCH_QWEN3_100M, seed=0, dtype=torch.bfloat16)
    llm = LLM(path, device="cuda", dtype="bfloat16", kv_cache_memory_gb=4, max_num_seqs=64)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 32000, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 512, (64,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=256, ignore_eos=True)
    for attempt in ("first (cold)", "second (warm)", "third (warm)"):
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        print(f"100M Qwen3 bf16, 64 requests x 256 tokens, {attempt} pass: "
              f"{64 * 256 / wall:.0f} tok/s ({wall:.1f} s)")
    return failures


if __name__ == "__main__":
    sys.exit(main())
