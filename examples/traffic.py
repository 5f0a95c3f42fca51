"""A bounded load generator for the serve -> train -> swap loop.

Sends arith-chain prompts (the bundled model's task) to one or more e3rl servers with
self-healing on, grades every answer on the client side, and posts feedback
(``POST /v1/feedback``) for a chosen fraction of the requests: the reward, or the reference
answer for the server's trainer to grade. Stops after ``--duration-s`` seconds or
``--max-requests`` requests, whichever comes first, and prints (or writes) a summary: requests,
errors, erasures per sample, client-graded accuracy, feedback sent, and the weight versions
seen, per time window.

    python examples/traffic.py --url http://127.0.0.1:8000 --duration-s 60 \\
        --concurrency 8 --feedback-fraction 0.25
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import sys
import time
from collections import Counter

import httpx

from e3rl.trainer.arith import format_prompt, iter_problems
from e3rl.trainer.grading import grade_arith


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", action="append", required=True,
                   help="server base URL (repeatable: requests go round-robin)")
    p.add_argument("--api-key", default=os.environ.get("E3RL_API_KEY"),
                   help="API key (default: $E3RL_API_KEY)")
    p.add_argument("--duration-s", type=float, default=60.0, help="stop after this long")
    p.add_argument("--max-requests", type=int, default=0, help="stop after this many (0: no cap)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--feedback-fraction", type=float, default=0.0,
                   help="fraction of requests whose outcome is sent as feedback")
    p.add_argument("--feedback", choices=("reward", "reference"), default="reward",
                   help="send the client-graded reward, or the reference answer")
    p.add_argument("--healing", choices=("on", "off", "server"), default="on",
                   help="ask for healing (on), refuse it (off), or use the server's default")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--n", type=int, default=1, help="samples per request")
    p.add_argument("--split", default="train", help="arith-chain split to draw prompts from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window-s", type=float, default=60.0, help="summary window")
    p.add_argument("--timeout-s", type=float, default=120.0, help="per-request timeout")
    p.add_argument("--out", help="write the summary JSON here (default: stdout)")
    args = p.parse_args(argv)
    if not 0.0 <= args.feedback_fraction <= 1.0:
        p.error("--feedback-fraction must be in [0, 1]")
    if args.duration_s <= 0 or args.concurrency < 1 or args.n < 1:
        p.error("--duration-s, --concurrency and --n must be positive")
    return args


class Stats:
    def __init__(self, window_s: float):
        self.start = time.monotonic()
        self.window_s = window_s
        self.total: Counter = Counter()
        self.windows: dict[int, Counter] = {}
        self.versions: Counter = Counter()
        self.errors: Counter = Counter()

    def add(self, **counts: float) -> None:
        w = self.windows.setdefault(int((time.monotonic() - self.start) // self.window_s),
                                    Counter())
        for k, v in counts.items():
            self.total[k] += v
            w[k] += v

    def summary(self) -> dict:
        def rates(c: Counter) -> dict:
            samples = max(c["samples"], 1)
            return {"requests": int(c["requests"]), "samples": int(c["samples"]),
                    "accuracy": round(c["correct"] / samples, 4),
                    "erasures_per_sample": round(c["erasures"] / samples, 4),
                    "feedback": int(c["feedback"]), "errors": int(c["errors"])}
        return {"seconds": round(time.monotonic() - self.start, 1), **rates(self.total),
                "errors_by_kind": dict(self.errors), "weight_versions": dict(self.versions),
                "windows": [{"start_s": k * self.window_s, **rates(c)}
                            for k, c in sorted(self.windows.items())]}


async def one_request(client: httpx.AsyncClient, url: str, problem, args, rng: random.Random,
                      stats: Stats) -> None:
    body = {"prompt": format_prompt(problem.question), "max_tokens": args.max_tokens,
            "temperature": args.temperature, "n": args.n, "seed": rng.getrandbits(31)}
    if args.healing != "server":
        body["healing"] = {"enabled": args.healing == "on"}
    try:
        r = await client.post(f"{url}/v1/completions", json=body)
    except httpx.HTTPError as exc:
        stats.errors[type(exc).__name__] += 1
        stats.add(errors=1)
        return
    if r.status_code != 200:
        stats.errors[f"HTTP {r.status_code}"] += 1
        stats.add(errors=1)
        return
    data = r.json()
    stats.versions[data.get("system_fingerprint", "?")] += 1
    send = rng.random() < args.feedback_fraction
    for choice in data["choices"]:
        correct = grade_arith(choice["text"], problem.answer)
        erasures = (choice.get("e3rl") or {}).get("num_erasures", 0)
        stats.add(samples=1, correct=int(correct), erasures=erasures)
        if send:
            feedback = {"id": data["id"], "index": choice["index"]}
            if args.feedback == "reward":
                feedback["reward"] = float(correct)
            else:
                feedback["reference"] = str(problem.answer)
            try:
                f = await client.post(f"{url}/v1/feedback", json=feedback)
                if f.status_code == 200:
                    stats.add(feedback=1)
                else:
                    stats.errors[f"feedback HTTP {f.status_code}"] += 1
            except httpx.HTTPError as exc:
                stats.errors[f"feedback {type(exc).__name__}"] += 1
    stats.add(requests=1)


async def run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    problems = iter_problems(args.split, args.seed)
    urls = itertools.cycle(args.url)
    rng = random.Random(args.seed)
    stats = Stats(args.window_s)
    deadline = time.monotonic() + args.duration_s
    issued = 0
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout_s,
                                 limits=limits) as client:
        async def worker() -> None:
            nonlocal issued
            while time.monotonic() < deadline and (not args.max_requests
                                                   or issued < args.max_requests):
                issued += 1
                await one_request(client, next(urls), next(problems), args, rng, stats)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return stats.summary()


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(run(args))
    text = json.dumps(summary, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 1 if summary["requests"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
