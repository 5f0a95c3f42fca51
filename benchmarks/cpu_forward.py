"""The CPU bf16 forward, piece by piece, each against its baseline in the same process.

    .venv/bin/python benchmarks/cpu_forward.py engines [--repeat 2]
    .venv/bin/python benchmarks/cpu_forward.py linears

``engines``: the 32-request mixed workload of ``peers.py`` (~100M Qwen3-shaped model, bf16,
greedy) through three engines built in this process and run interleaved, ``--repeat`` times
each: transformers' forward with oneDNN-prepacked linears (``model_impl="transformers"``, the
engine before its own forward), e3rl's forward with oneDNN linears, and e3rl's forward with
e3rl's AVX512_BF16 product (``kernels.small_gemm``; the default where the CPU has it). Prints
wall time split into the steps that carry prefill and the decode-only steps, and the median
ratio to the first engine.

``linears``: the model's 85 projections (12 layers x q/k/v/o/gate/up/down + lm_head) one after
the other, weights in memory (~180 MB, as in a decode step), at 1-128 rows: oneDNN's prepacked
product against ``small_gemm``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LoadMonitor, bench_model, mixed_workload  # noqa: E402

from e3rl.engine import cpu_model, kernels  # noqa: E402
from e3rl.engine.config import EngineConfig  # noqa: E402
from e3rl.engine.llm_engine import LLMEngine  # noqa: E402
from e3rl.engine.sampling_params import SamplingParams  # noqa: E402


def make_engine(path: Path, impl: str, tiled: bool) -> LLMEngine:
    """An engine with ``model_impl=impl``; ``tiled=False`` keeps oneDNN's linears even where
    e3rl's bf16 product applies (as on a CPU without AVX512_BF16)."""
    original = cpu_model._tileable
    if not tiled:
        cpu_model._tileable = lambda module: False
    try:
        return LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", model_impl=impl))
    finally:
        cpu_model._tileable = original


def run_workload(engine: LLMEngine, work) -> tuple[float, float, float]:
    """Wall seconds of the whole workload, of the steps that carry prefill, of the rest."""
    for i, (prompt, n) in enumerate(zip(work.prompts, work.output_lens)):
        engine.add_request(str(i), prompt,
                           SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    prefill = decode = 0.0
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        has_prefill = any(s.num_computed_tokens < s.num_prompt_tokens
                          for s in [*engine.scheduler.waiting, *engine.scheduler.running])
        t = time.perf_counter()
        engine.step()
        if has_prefill:
            prefill += time.perf_counter() - t
        else:
            decode += time.perf_counter() - t
    return time.perf_counter() - t0, prefill, decode


def engines(repeat: int) -> None:
    path, work = bench_model(), mixed_workload(32)
    variants = {"transformers forward, oneDNN linears": make_engine(path, "transformers", False),
                "e3rl forward, oneDNN linears": make_engine(path, "e3rl", False)}
    if kernels.gemm_available():
        variants["e3rl forward, e3rl bf16 linears"] = make_engine(path, "e3rl", True)
    else:
        print("no AVX512_BF16 on this CPU: e3rl's bf16 product is not built")
    walls: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, engine in variants.items():
            with LoadMonitor() as load:
                wall, prefill, decode = run_workload(engine, work)
            walls[name].append(wall)
            print(f"{name}: {wall:.2f} s, {work.num_output_tokens / wall:.1f} tok/s (prefill "
                  f"steps {prefill:.2f} s, decode steps {decode:.2f} s; {load.note()})",
                  flush=True)
    base = statistics.median(next(iter(walls.values())))
    print()
    for name, w in walls.items():
        m = statistics.median(w)
        print(f"{name:<40} median {m:6.2f} s {work.num_output_tokens / m:7.1f} tok/s "
              f"{base / m:5.2f}x")


def linears() -> None:
    kernels.load_cpu_kernels()
    if not kernels.gemm_available():
        raise SystemExit("no AVX512_BF16 on this CPU: e3rl's bf16 product is not built")
    torch.manual_seed(0)
    shapes = [(768, 768), (768, 256), (768, 256), (768, 768), (768, 2048), (768, 2048),
              (2048, 768)] * 12 + [(768, 32000)]  # (in, out) of the bench model
    weights = [torch.randn(o, i).bfloat16() for i, o in shapes]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, 32) for w in weights]
    tiled = [kernels.tile_weight(w) for w in weights]
    nbytes = sum(w.numel() * 2 for w in weights)

    def timed(rows: int, use_tiled: bool) -> float:
        xs = {i: torch.randn(rows, i).bfloat16() for i in (768, 2048)}

        def once():
            for (i, _), p, t in zip(shapes, packed, tiled):
                if use_tiled:
                    kernels.small_gemm(xs[i], t, None)
                else:
                    torch.ops.mkldnn._linear_pointwise(xs[i], p, None, "none", [], "")
        once()
        t0 = time.perf_counter()
        for _ in range(5):
            once()
        return (time.perf_counter() - t0) / 5

    print(f"85 projections, {nbytes / 1e6:.0f} MB of bf16 weights, {torch.get_num_threads()} "
          "threads")
    for rows in (1, 8, 16, 32, 64, 128):
        with LoadMonitor() as load:
            a, b = timed(rows, False), timed(rows, True)
        print(f"rows {rows:>3}: oneDNN packed {a * 1e3:6.1f} ms ({nbytes / a / 1e9:4.1f} GB/s), "
              f"small_gemm {b * 1e3:6.1f} ms ({nbytes / b / 1e9:4.1f} GB/s): {a / b:.2f}x "
              f"({load.note()})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["engines", "linears"])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    engines(args.repeat) if args.what == "engines" else linears()


if __name__ == "__main__":
    main()
