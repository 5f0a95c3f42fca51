"""Prefix caching: time to first token of 32 requests sharing a 1,000-token prefix, with
automatic prefix caching on and off, measured in one run; prints the ratio.

Model: a small Qwen3-shaped random model (4 layers, hidden 256, 2,048-token context; built once
under /tmp). Each engine first serves one request with the shared prefix (with caching on, it
fills the cache), then the 32 requests arrive together; TTFT is each request's first token
time minus its arrival, averaged. Both engines run the same workload in the same process.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from e3rl.engine import LLM, SamplingParams
from e3rl.engine.model_factory import build_random_model

try:
    from common import CACHE
except ImportError:  # run from elsewhere
    from benchmarks.common import CACHE

CONFIG = dict(model_type="qwen3", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=2048)


def model_path():
    path = CACHE / "qwen3-prefix-bench"
    if not (path / "config.json").exists():
        build_random_model(path, CONFIG, seed=0)
    return path


def run(path, caching: bool, prefix: list[int], suffixes: list[list[int]],
        max_tokens: int) -> float:
    llm = LLM(path, dtype="float32", enable_prefix_caching=caching, num_kv_blocks=4096)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([prefix + [5]], params)  # warm-up; fills the cache when caching is on
    engine = llm.engine
    start = time.monotonic()
    for i, suffix in enumerate(suffixes):
        engine.add_request(f"r{i}", prefix + suffix, params)
    seqs = [engine.requests[f"r{i}"].seqs[0] for i in range(len(suffixes))]
    while engine.has_unfinished_requests():
        engine.step()
    ttft = statistics.mean(s.first_token_time - s.arrival_time for s in seqs)
    print(f"caching {'on ' if caching else 'off'}: mean TTFT {ttft * 1000:8.1f} ms, all done "
          f"in {time.monotonic() - start:6.2f} s, hit tokens "
          f"{engine.stats().prefix_cache_hit_tokens}/{engine.stats().prefix_cache_queried_tokens}")
    return ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    rng = random.Random(0)
    path = model_path()
    prefix = [rng.randrange(4, 100) for _ in range(args.prefix_tokens)]
    suffixes = [[rng.randrange(4, 100) for _ in range(rng.randint(8, 32))]
                for _ in range(args.requests)]
    off = run(path, False, prefix, suffixes, args.max_tokens)
    on = run(path, True, prefix, suffixes, args.max_tokens)
    print(f"TTFT off / on = {off / on:.2f}x")


if __name__ == "__main__":
    main()
