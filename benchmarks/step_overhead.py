"""The engine's own CPU time per step: ``LLMEngine.step()`` wall time minus the model's forward,
in steady-state decode, at several batch sizes.

Model: a near-empty Qwen3 (1 layer, hidden 32, the 100-token character vocabulary; built once
under /tmp), so what is left of a step is the engine: scheduling, input building, sampling,
detokenizing, stop checks and the output deltas. All prompts are prefilled first (and a few
decode steps run as a warm-up); then ``--steps`` decode steps are timed one by one, the forward
(``model.forward``, wrapped with a timer) separately. Prints the median per batch size.

``--baseline DIR`` also runs an older copy of the engine package (``DIR/engine``, e.g. from
``git archive <commit> engine | tar -x -C DIR``) in the same process, its steps interleaved
with this engine's, so that both see the same load on a shared machine.

    python benchmarks/step_overhead.py                  # batch 1, 32, 64, 128; greedy + T=1
    python benchmarks/step_overhead.py --profile 64     # + cProfile of 64-sequence decode
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import pstats
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

import e3rl.engine
from e3rl.engine.model_factory import build_random_model

try:
    from common import CACHE, LoadMonitor
except ImportError:  # run from elsewhere
    from benchmarks.common import CACHE, LoadMonitor

CONFIG = dict(model_type="qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
              max_position_embeddings=4096)


def model_path() -> Path:
    path = CACHE / "qwen3-step-overhead"
    if not (path / "config.json").exists():
        build_random_model(path, CONFIG, seed=0)
    return path


def import_baseline(directory: str):
    """The engine package in ``directory/engine``, imported as ``e3rl_baseline.engine`` (its
    imports are relative, so it runs beside ``e3rl.engine``). Its paged attention registers
    with transformers under a name of its own, so each model runs its own engine's."""
    root = types.ModuleType("e3rl_baseline")
    root.__path__ = [str(Path(directory).resolve())]
    sys.modules["e3rl_baseline"] = root
    package = importlib.import_module("e3rl_baseline.engine")
    attention = importlib.import_module("e3rl_baseline.engine.attention")
    attention.ATTN_IMPLEMENTATION += "_baseline"
    return package


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


class Subject:
    """One engine under test: its offline ``LLM``, forward timer and ``SamplingParams``."""

    def __init__(self, name: str, package, num_threads: int | None, max_batch: int,
                 prompt_len: int, max_tokens: int):
        self.name = name
        self.package = package
        self.llm = package.LLM(model_path(), dtype="float32", device="cpu",
                               num_threads=num_threads, max_num_seqs=max_batch,
                               max_num_batched_tokens=max(2048, max_batch * prompt_len),
                               num_kv_blocks=max_batch * (-(-(prompt_len + max_tokens) // 16)
                                                          + 1))
        self.engine = self.llm.engine
        self.timer = ForwardTimer(self.engine.runner.model)

    def start_decoding(self, batch: int, prompt_len: int, params: dict, warmup: int) -> None:
        """Queue ``batch`` requests, step until each has sampled its first token, warm up."""
        engine = self.engine
        vocab = engine.vocab_size
        for i in range(batch):
            prompt = [4 + (i * 7 + j * 13) % (vocab - 4) for j in range(prompt_len)]
            engine.add_request(f"b{batch}-{i}", prompt, self.package.SamplingParams(**params))
        seqs = [s for r in engine.requests.values() for s in r.seqs]
        while any(s.num_output_tokens == 0 for s in seqs):
            engine.step()
        for _ in range(warmup):
            engine.step()
        assert len(engine.scheduler.running) == batch and not engine.scheduler.waiting

    def timed_step(self, times: StepTimes, profile: cProfile.Profile | None = None) -> None:
        fw, fc = self.timer.wall_s, self.timer.cpu_s
        if profile is not None:
            profile.enable()
        t0, c0 = time.perf_counter(), time.thread_time()
        self.engine.step()
        cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
        if profile is not None:
            profile.disable()
        times.wall.append(wall)
        times.cpu.append(cpu)
        times.forward_wall.append(self.timer.wall_s - fw)
        times.forward_cpu.append(self.timer.cpu_s - fc)

    def abort_all(self) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)


def measure(subjects: list[Subject], batch: int, steps: int, warmup: int, prompt_len: int,
            params: dict, profiles: list[cProfile.Profile] | None = None) -> list[StepTimes]:
    """Times ``steps`` decode steps at ``batch`` sequences on each subject, one step of each
    in turn (the order alternating), so that all see the same load."""
    for subject in subjects:
        subject.start_decoding(batch, prompt_len, params, warmup)
    times = [StepTimes() for _ in subjects]
    for step in range(steps):
        turn = range(len(subjects)) if step % 2 == 0 else reversed(range(len(subjects)))
        for k in turn:
            subjects[k].timed_step(times[k], profiles[k] if profiles else None)
    for subject in subjects:
        subject.abort_all()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,32,64,128")
    ap.add_argument("--steps", type=int, default=200, help="timed decode steps per case")
    ap.add_argument("--warmup", type=int, default=20, help="untimed decode steps first")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="run every case this many times")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: all cores, as the engine runs)")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also run the engine package in DIR/engine, steps interleaved")
    ap.add_argument("--profile", type=int, default=None, metavar="BATCH",
                    help="also profile greedy decode at this batch size (cProfile) and print "
                         "the top functions by own time")
    ap.add_argument("--top", type=int, default=25, help="profile rows to print")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    max_batch = max(batches + [args.profile or 0])
    max_tokens = args.warmup + args.steps + 8
    packages = [("current", e3rl.engine)]
    if args.baseline:
        packages.insert(0, ("baseline", import_baseline(args.baseline)))
    subjects = [Subject(name, package, args.threads, max_batch, args.prompt_len, max_tokens)
                for name, package in packages]
    cases = {"greedy": dict(temperature=0, max_tokens=max_tokens, ignore_eos=True),
             "T=1": dict(temperature=1.0, seed=0, max_tokens=max_tokens, ignore_eos=True)}
    measure(subjects, 8, 20, 5, args.prompt_len, cases["greedy"])  # warm up the process
    print(f"torch threads {torch.get_num_threads()}, {args.steps} steps per case, prompt "
          f"{args.prompt_len} tokens; ms per step, median (engine = step - forward; wall "
          "clock, and this thread's CPU time, which being descheduled does not inflate)")
    print(f"{'engine':8} {'case':6} {'batch':>5} {'step':>7} {'forward':>7} {'engine':>7} "
          f"{'p90':>7} {'engine CPU':>10}   load")
    for _ in range(args.repeats):
        for name, params in cases.items():
            for batch in batches:
                with LoadMonitor() as load:
                    all_times = measure(subjects, batch, args.steps, args.warmup,
                                        args.prompt_len, params)
                for subject, t in zip(subjects, all_times):
                    engine = t.engine_ms()
                    print(f"{subject.name:8} {name:6} {batch:5d} "
                          f"{1e3 * statistics.median(t.wall):7.3f} "
                          f"{1e3 * statistics.median(t.forward_wall):7.3f} "
                          f"{statistics.median(engine):7.3f} "
                          f"{engine[int(0.9 * len(engine))]:7.3f} "
                          f"{statistics.median(t.engine_ms(cpu=True)):10.3f}   {load.note()}",
                          flush=True)
    if args.profile:
        profiles = [cProfile.Profile() for _ in subjects]
        measure(subjects, args.profile, args.steps, args.warmup, args.prompt_len,
                cases["greedy"], profiles)
        for subject, profile in zip(subjects, profiles):
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
            print(f"\ncProfile of the {subject.name} engine, greedy decode at batch "
                  f"{args.profile}, {args.steps} steps, by own time (cProfile inflates many "
                  "small Python calls):")
            print(out.getvalue())


if __name__ == "__main__":
    main()
