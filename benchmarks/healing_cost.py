"""What an erasure costs, and what healing costs when it never fires.

1. After a 1,000-token prefix: generate 32 tokens normally; erase those 32 tokens and
   regenerate 32 (only the last kept token and the 32 new ones are computed); restart from
   the prompt: with the prefix as the prompt (prefill it again, then 32 tokens), and with
   the prefix generated (sample all 1,032 tokens again).
2. Throughput of a mixed workload with healing on but a threshold that is never reached, vs
   healing off, in the same run: ``--pairs`` back-to-back pairs in alternating order; the
   median of the per-pair ratios, each pair's ratio and best vs best are printed.

    .venv/bin/python benchmarks/healing_cost.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LoadMonitor, bench_model, mixed_workload  # noqa: E402

from e3rl.engine import LLM, SamplingParams  # noqa: E402


def _decode(engine, seq, num_tokens):
    target = seq.num_output_tokens + num_tokens
    t0 = time.perf_counter()
    while seq.num_output_tokens < target:
        engine.step()
    return time.perf_counter() - t0


def _run_to_end(engine):
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def erase_cost(llm, prefix_len=1000, seg=32, repeats=3):
    """Prefix = a 1,000-token prompt: 32 new tokens; erase them and regenerate 32; restart
    (prefill the prefix again, then 32 tokens)."""
    engine = llm.engine
    prompt = [(7 * i) % 30000 + 4 for i in range(prefix_len)]
    normal, erase, restart = [], [], []
    for r in range(repeats):
        rid = f"cost{r}"
        engine.add_request(rid, prompt, SamplingParams(temperature=1.0, seed=r, max_tokens=4 * seg,
                                                       ignore_eos=True))
        seq = engine.requests[rid].seqs[0]
        engine.step()  # prefill (and first token)
        normal.append(_decode(engine, seq, seg))
        t0 = time.perf_counter()
        engine.scheduler.truncate(seq, seq.num_output_tokens - seg)
        erase.append(time.perf_counter() - t0 + _decode(engine, seq, seg))
        engine.abort(rid)
        engine.add_request(rid, prompt, SamplingParams(temperature=1.0, seed=r, max_tokens=seg,
                                                       ignore_eos=True))
        restart.append(_run_to_end(engine))
    return min(normal), min(erase), min(restart)


def erase_vs_resample(llm, prompt_len=24, generated=1000, seg=32):
    """Prefix = a short prompt + 1,000 generated tokens (a long reasoning chain): erasing the
    last 32 tokens and regenerating them vs sampling the whole sequence again from the
    prompt (what rejection sampling or a restart costs)."""
    engine = llm.engine
    prompt = [(11 * i) % 30000 + 4 for i in range(prompt_len)]
    engine.add_request("long", prompt, SamplingParams(temperature=1.0, seed=1,
                                                      max_tokens=generated + 2 * seg,
                                                      ignore_eos=True))
    seq = engine.requests["long"].seqs[0]
    _decode(engine, seq, generated + seg)
    t0 = time.perf_counter()
    engine.scheduler.truncate(seq, seq.num_output_tokens - seg)
    erase = time.perf_counter() - t0 + _decode(engine, seq, seg)
    engine.abort("long")
    engine.add_request("again", prompt, SamplingParams(temperature=1.0, seed=2,
                                                       max_tokens=generated + seg,
                                                       ignore_eos=True))
    return erase, _run_to_end(engine)


def never_triggered(llm, work, pairs: int):
    """Wall times of healing off and on (never firing), run as ``pairs`` back-to-back pairs
    whose order alternates (off-on, on-off, ...), so drift in the machine's speed falls on
    both. Returns the per-pair ratios off/on and each configuration's times."""
    base = [SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True)
            for i, n in enumerate(work.output_lens)]
    healed = [p.clone(healing={"threshold": math.inf}) for p in base]
    times = {"off": [], "on": []}
    order = [("off", base), ("on", healed)]
    for k in range(pairs):
        for name, params in order if k % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            llm.generate(work.prompts, params, use_tqdm=False)
            times[name].append(time.perf_counter() - t0)
    return [off / on for off, on in zip(times["off"], times["on"])], times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=8,
                        help="healing off/on pairs for the never-triggered comparison")
    args = parser.parse_args()
    torch.manual_seed(0)
    llm = LLM(bench_model(), dtype=args.dtype, kv_cache_memory_gb=2.0)
    with LoadMonitor() as load:
        normal, erase, restart = erase_cost(llm)
    print(f"[{args.dtype}] after a 1000-token prefix: 32 tokens {normal:.3f} s; erase + regenerate "
          f"32 {erase:.3f} s ({erase / normal:.2f}x); restart from the prompt {restart:.3f} s "
          f"({restart / erase:.1f}x the erase)  ({load.note()})")
    with LoadMonitor() as load:
        erase, resample = erase_vs_resample(llm)
    print(f"[{args.dtype}] after a 24-token prompt + 1000 generated tokens: erase + regenerate "
          f"32 {erase:.3f} s; resample all 1032 tokens from the prompt {resample:.1f} s "
          f"({resample / erase:.0f}x the erase)  ({load.note()})")
    work = mixed_workload(args.num_requests, output_range=(16, 128))
    with LoadMonitor() as load:
        ratios, times = never_triggered(llm, work, args.pairs)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"[{args.dtype}] healing never triggered: {work.num_output_tokens / on:.1f} tok/s vs off "
          f"{work.num_output_tokens / off:.1f} tok/s (medians of {args.pairs}); per pair "
          f"{100 * statistics.median(ratios):.1f}% of healing-off throughput (median; pairs "
          f"{', '.join(f'{100 * r:.1f}' for r in ratios)}); best vs best "
          f"{100 * min(times['off']) / min(times['on']):.1f}%  ({load.note()})")

if __name__ == "__main__":
    main()
