"""The engine's own CPU time per step: ``LLMEngine.step()`` wall time minus the model's forward,
in steady-state decode, at several batch sizes.

Model: a near-empty Qwen3 (1 layer, hidden 32, the 100-token character vocabulary; built once
under /tmp), so what is left of a step is the engine: scheduling, input building, sampling,
detokenizing, stop checks and the output deltas. All prompts are prefilled first (and a few
decode steps run as a warm-up); then ``--steps`` decode steps are timed one by one, the forward
(``model.forward``, wrapped with a timer) separately. Prints the median per batch size.

    python benchmarks/step_overhead.py                  # batch 1, 32, 64, 128; greedy + T=1
    python benchmarks/step_overhead.py --profile 64     # + cProfile of 64-sequence decode
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from dataclasses import dataclass, field

import torch

from e3rl.engine import LLM, SamplingParams
from e3rl.engine.model_factory import build_random_model

try:
    from common import CACHE, LoadMonitor
except ImportError:  # run from elsewhere
    from benchmarks.common import CACHE, LoadMonitor

CONFIG = dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
              max_position_embeddings=4096)


def model_path():
    path = CACHE / "qwen3-step-overhead"
    if not (path / "config.json").exists():
        build_random_model(path, CONFIG, seed=0)
    return path


class ForwardTimer:
    """Wraps ``model.forward`` (an instance attribute, so ``nn.Module.__call__`` finds it) and
    adds up the wall seconds and this thread's CPU seconds spent inside it."""

    def __init__(self, model: torch.nn.Module):
        self.wall_s = 0.0
        self.cpu_s = 0.0
        inner = model.forward

        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.cpu_s += time.thread_time() - c0
                self.wall_s += time.perf_counter() - t0

        model.forward = timed


@dataclass
class StepTimes:
    """Per timed step: wall and thread-CPU seconds of ``step()`` and of its forward."""

    wall: list[float] = field(default_factory=list)
    forward_wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    forward_cpu: list[float] = field(default_factory=list)

    def engine_ms(self, cpu: bool = False) -> list[float]:
        pairs = zip(self.cpu, self.forward_cpu) if cpu else zip(self.wall, self.forward_wall)
        return sorted(1e3 * (a - b) for a, b in pairs)


def start_decoding(llm: LLM, batch: int, prompt_len: int, params: SamplingParams) -> None:
    """Queue ``batch`` requests and step until every one has sampled its first token."""
    engine = llm.engine
    vocab = engine.vocab_size
    for i in range(batch):
        prompt = [4 + (i * 7 + j * 13) % (vocab - 4) for j in range(prompt_len)]
        engine.add_request(f"b{batch}-{i}", prompt, params)
    seqs = [s for r in engine.requests.values() for s in r.seqs]
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()


def measure(llm: LLM, timer: ForwardTimer, batch: int, steps: int, warmup: int,
            prompt_len: int, params: SamplingParams,
            profile: cProfile.Profile | None = None) -> StepTimes:
    """Times ``steps`` decode steps at ``batch`` sequences, one by one."""
    engine = llm.engine
    start_decoding(llm, batch, prompt_len, params)
    for _ in range(warmup):
        engine.step()
    times = StepTimes()
    for _ in range(steps):
        assert len(engine.scheduler.running) == batch and not engine.scheduler.waiting
        fw, fc = timer.wall_s, timer.cpu_s
        if profile is not None:
            profile.enable()
        t0, c0 = time.perf_counter(), time.thread_time()
        engine.step()
        cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        times.wall.append(wall)
        times.cpu.append(cpu)
        times.forward_wall.append(timer.wall_s - fw)
        times.forward_cpu.append(timer.cpu_s - fc)
    for request_id in list(engine.requests):
        engine.abort(request_id)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,32,64,128")
    ap.add_argument("--steps", type=int, default=200, help="timed decode steps per case")
    ap.add_argument("--warmup", type=int, default=20, help="untimed decode steps first")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="run every case this many times")
    ap.add_argument("--profile", type=int, default=None, metavar="BATCH",
                    help="also profile greedy decode at this batch size (cProfile) and print "
                         "the top functions by own time")
    ap.add_argument("--top", type=int, default=25, help="profile rows to print")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: all cores, as the engine runs)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    max_batch = max(batches + [args.profile or 0])
    max_tokens = args.warmup + args.steps + 8
    llm = LLM(model_path(), dtype="float32", device="cpu", num_threads=args.threads,
              max_num_seqs=max_batch,
              max_num_batched_tokens=max(2048, max_batch * args.prompt_len),
              num_kv_blocks=max_batch * (-(-(args.prompt_len + max_tokens) // 16) + 1))
    timer = ForwardTimer(llm.engine.runner.model)
    cases = {"greedy": SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
             "T=1": SamplingParams(temperature=1.0, seed=0, max_tokens=max_tokens,
                                   ignore_eos=True)}
    measure(llm, timer, 8, 20, 5, args.prompt_len, cases["greedy"])  # warm up the process
    print(f"torch threads {torch.get_num_threads()}, {args.steps} steps per case, prompt "
          f"{args.prompt_len} tokens; ms per step, median (engine = step - forward; wall "
          "clock, and this thread's CPU time, which being descheduled does not inflate)")
    print(f"{'case':8} {'batch':>5} {'step':>7} {'forward':>7} {'engine':>7} {'p90':>7} "
          f"{'engine CPU':>10}   load")
    for _ in range(args.repeats):
        for name, params in cases.items():
            for batch in batches:
                with LoadMonitor() as load:
                    t = measure(llm, timer, batch, args.steps, args.warmup, args.prompt_len,
                                params)
                engine = t.engine_ms()
                print(f"{name:8} {batch:5d} {1e3 * statistics.median(t.wall):7.3f} "
                      f"{1e3 * statistics.median(t.forward_wall):7.3f} "
                      f"{statistics.median(engine):7.3f} {engine[int(0.9 * len(engine))]:7.3f} "
                      f"{statistics.median(t.engine_ms(cpu=True)):10.3f}   {load.note()}",
                      flush=True)
    if args.profile:
        profile = cProfile.Profile()
        measure(llm, timer, args.profile, args.steps, args.warmup, args.prompt_len,
                cases["greedy"], profile)
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
        print(f"\ncProfile of greedy decode at batch {args.profile}, {args.steps} steps, by own "
              "time (cProfile inflates many small Python calls):")
        print(out.getvalue())


if __name__ == "__main__":
    main()
