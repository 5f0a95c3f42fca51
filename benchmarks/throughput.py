"""Offline throughput: e3rl's engine vs Hugging Face ``generate`` (static batches) and
transformers' own continuous batching, on the same fixed-seed mixed workload, in one run;
plus batch-1 decode: the engine vs a bare ``model(...)`` + ``DynamicCache`` loop.

    .venv/bin/python benchmarks/throughput.py [--dtypes float32,bfloat16] [--skip-cb]
        [--attention-backend auto|native|sdpa] [--repeat N]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LoadMonitor, bench_model, mixed_workload  # noqa: E402

from e3rl.engine import LLM, SamplingParams  # noqa: E402
from e3rl.engine.config import EngineConfig  # noqa: E402

ENGINE_DEFAULT_BUDGET = next(f.default for f in dataclasses.fields(EngineConfig)
                             if f.name == "max_num_batched_tokens")
from e3rl.engine.model_runner import tune_cpu_allocator  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_engine(path, dtype, work, budget, attention_backend):
    llm = LLM(path, dtype=dtype, kv_cache_memory_gb=2.0, max_num_seqs=len(work.prompts),
              max_num_batched_tokens=budget, attention_backend=attention_backend)
    runner = llm.engine.runner
    print(f"[{dtype}] engine: {runner.attention_backend} decode attention, {runner.fast_paths}")
    llm.generate([work.prompts[0][:16]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
    return llm


def run_engine(llm, work):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in work.output_lens]
    t0 = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    assert sum(len(o.outputs[0].token_ids) for o in outs) == work.num_output_tokens
    return wall, [o.outputs[0].token_ids for o in outs]


def load_hf(path, dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                 use_safetensors=True, dtype=DTYPES[dtype],
                                                 attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def run_hf_static(model, work, batch_size):
    """Static batching: left-padded batches in arrival order, each run to its longest output."""
    total = 0.0
    outs = []
    for b in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[b:b + batch_size]
        lens = work.output_lens[b:b + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        t0 = time.perf_counter()
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens),
                             do_sample=False)
        total += time.perf_counter() - t0
        outs += [gen[i, width:width + n].tolist() for i, n in enumerate(lens)]
    return total, outs


@torch.inference_mode()
def run_hf_cb(model, work, budget):
    """transformers' continuous batching, sized for this workload (its default sizes the cache
    from free RAM and is slow on CPU)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    need = sum(len(p) + n for p, n in zip(work.prompts, work.output_lens))
    cfg = ContinuousBatchingConfig(page_size=16, num_blocks=need // 16 + 2 * len(work.prompts),
                                   max_batch_tokens=budget, allow_block_sharing=False)
    gen_cfg = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0,
                               max_new_tokens=max(work.output_lens))
    manager = model.init_continuous_batching(generation_config=gen_cfg,
                                             continuous_batching_config=cfg)
    manager.start()
    try:
        t0 = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=n) for p, n in zip(work.prompts, work.output_lens)]
        results = {}
        while len(results) < len(ids):
            r = manager.get_result(timeout=60)
            if r is None:
                raise RuntimeError("transformers continuous batching stopped early")
            if r.is_finished():
                results[r.request_id] = r
        wall = time.perf_counter() - t0
    finally:
        manager.stop(block=True, timeout=30)
    return wall, [results[i].generated_tokens for i in ids]


@torch.inference_mode()
def decode_batch1(path, dtype, prompt_len=128, new_tokens=128):
    """Per-token time at batch 1: the engine vs a bare DynamicCache loop (same model)."""
    from transformers import DynamicCache

    model = load_hf(path, dtype)
    prompt = list(range(10, 10 + prompt_len))

    def bare():
        cache = DynamicCache()
        ids = torch.tensor([prompt])
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(new_tokens - 1):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)

    llm = LLM(path, dtype=dtype, kv_cache_memory_gb=0.5)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    engine = lambda: llm.generate([prompt], params, use_tqdm=False)  # noqa: E731
    bare(), engine()  # warm-up
    times = {"bare": [], "engine": []}
    for _ in range(3):  # interleaved, best of 3
        for name, fn in (("bare", bare), ("engine", engine)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / new_tokens)
    return min(times["bare"]), min(times["engine"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--budget", type=int, default=ENGINE_DEFAULT_BUDGET,
                        help="tokens per step, engine and CB (default: the engine's default)")
    parser.add_argument("--skip-cb", action="store_true")
    parser.add_argument("--skip-static", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--attention-backend", default="auto", help="engine: auto | native | sdpa")
    parser.add_argument("--repeat", type=int, default=1, help="engine and HF static runs, "
                        "interleaved; the median ratio is printed")
    args = parser.parse_args()
    # The engine tunes glibc malloc when it starts on CPU (process-wide); do it first so every
    # system in this run, baselines included, runs with the same allocator settings.
    tuned = tune_cpu_allocator()
    torch.manual_seed(0)
    path = bench_model()
    work = mixed_workload(args.num_requests)
    print(f"model {path} (Qwen3, ~100M params, random weights); {len(work.prompts)} requests, "
          f"prompts 16-512, outputs 16-256 ({work.num_output_tokens} output tokens); "
          f"torch threads {torch.get_num_threads()}; glibc malloc tuned for all systems: {tuned}")
    for dtype in args.dtypes.split(","):
        llm = make_engine(path, dtype, work, args.budget, args.attention_backend)
        model = None if args.skip_static else load_hf(path, dtype)
        ratios = []
        for _ in range(args.repeat):
            with LoadMonitor() as load:
                wall, engine_out = run_engine(llm, work)
            tps = work.num_output_tokens / wall
            print(f"[{dtype}] e3rl engine           {tps:8.1f} tok/s  ({wall:6.1f} s, "
                  f"{load.note()})")
            if model is None:
                continue
            with LoadMonitor() as load:
                hf_wall, hf_out = run_hf_static(model, work, args.hf_batch_size)
            hf_tps = work.num_output_tokens / hf_wall
            same = sum(a == b for a, b in zip(engine_out, hf_out))
            ratios.append(tps / hf_tps)
            print(f"[{dtype}] HF generate (static, batch {args.hf_batch_size}) {hf_tps:8.1f} tok/s  "
                  f"({hf_wall:6.1f} s, {load.note()})  engine/HF = {tps / hf_tps:.2f}x  "
                  f"[identical outputs {same}/{len(work.prompts)}]")
        if len(ratios) > 1:
            print(f"[{dtype}] engine/HF static over {len(ratios)} interleaved runs: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}x")
        del llm
        if not args.skip_cb:
            model = model or load_hf(path, dtype)
            with LoadMonitor() as load:
                cb_wall, cb_out = run_hf_cb(model, work, args.budget)
            cb_tps = work.num_output_tokens / cb_wall
            same = sum(a == b for a, b in zip(engine_out, cb_out))
            print(f"[{dtype}] HF continuous batching {cb_tps:8.1f} tok/s  ({cb_wall:6.1f} s, "
                  f"{load.note()})  engine/CB = {tps / cb_tps:.2f}x  "
                  f"[identical outputs {same}/{len(work.prompts)}]")
        if not args.skip_decode:
            with LoadMonitor() as load:
                bare, eng = decode_batch1(path, dtype)
            print(f"[{dtype}] batch-1 decode: bare DynamicCache loop {1000 * bare:.1f} ms/token, "
                  f"engine {1000 * eng:.1f} ms/token, engine/bare = {eng / bare:.2f}x  ({load.note()})")


if __name__ == "__main__":
    main()
