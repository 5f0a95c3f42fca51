"""The ``e3rl eval`` and ``e3rl calibrate`` subcommands."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .cli import fail
from .datasets import DataError, load_problems
from .evaluate import EvalSettings, evaluate_in_process, evaluate_over_http

logger = logging.getLogger(__name__)

HEALING_FLAGS = {  # CLI flag -> (healing option, type)
    "healing_score": ("score", str), "healing_quantile": ("quantile", float),
    "healing_threshold": ("threshold", float), "healing_kappa": ("kappa", float),
    "healing_combine": ("combine", str), "healing_max_erasures": ("max_erasures", int),
    "healing_max_retries": ("max_retries_per_segment", int),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="Evaluate a model on verifiable problems.")
    _data_arguments(ev)
    where = ev.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="Model directory (runs in-process through the engine).")
    where.add_argument("--url", help="A running server's base URL (uses /v1/completions).")
    ev.add_argument("--served-model", help="Model name to send with --url (default: the first "
                                           "of /v1/models).")
    ev.add_argument("--api-key", help="API key for --url.")
    ev.add_argument("--concurrency", type=int, default=16)
    ev.add_argument("--retries", type=int, default=3)
    ev.add_argument("--n", type=int, default=1, help="Samples per problem.")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-tokens", type=int, default=256)
    ev.add_argument("--healing", choices=("on", "off"), default="off")
    ev.add_argument("--healing-options", help="Healing options as JSON (see HealingParams).")
    for flag, (_, kind) in HEALING_FLAGS.items():
        ev.add_argument("--" + flag.replace("_", "-"), type=kind)
    ev.add_argument("--compare", action="store_true",
                    help="Plain sampling, healing and majority vote on the same problems/seeds.")
    ev.add_argument("--report", help="Write the JSON report here.")
    ev.set_defaults(func=run_eval)

    cal = subparsers.add_parser("calibrate", help="Calibrate healing thresholds for a model.")
    _data_arguments(cal, default="arith-chain:validation")
    cal.add_argument("--model", required=True)
    cal.add_argument("--temperatures", default="1.0,0.7")
    cal.add_argument("--quantile", type=float, default=0.95)
    cal.add_argument("--score", default="mean_nll")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--max-tokens", type=int, default=256)
    cal.set_defaults(func=run_calibrate)


def _data_arguments(parser, default: str | None = None) -> None:
    parser.add_argument("--data", default=default, required=default is None,
                        help="JSONL/Parquet file or a built-in name (arith-chain:test, ...).")
    parser.add_argument("--limit", type=int, help="At most this many problems.")
    parser.add_argument("--question-column")
    parser.add_argument("--answer-column")
    parser.add_argument("--prompt-format", choices=("auto", "arith", "raw"), default="auto")


def _problems(args):
    try:
        return load_problems(args.data, limit=args.limit, question_column=args.question_column,
                             answer_column=args.answer_column, prompt_format=args.prompt_format)
    except DataError as exc:
        fail(str(exc))


def healing_options(args) -> dict:
    options = json.loads(args.healing_options) if args.healing_options else {}
    for flag, (name, _) in HEALING_FLAGS.items():
        if getattr(args, flag) is not None:
            options[name] = getattr(args, flag)
    return options


def run_eval(args) -> int:
    problems = _problems(args)
    base = EvalSettings(n=args.n, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, max_tokens=args.max_tokens,
                        healing=healing_options(args) if args.healing == "on" else None)
    llm = None
    if args.model:
        from e3rl.engine import LLM

        llm = LLM(args.model)

    def run(settings: EvalSettings):
        if llm is not None:
            result = evaluate_in_process(llm, problems, settings)
        else:
            result = evaluate_over_http(args.url, args.served_model, problems, settings,
                                        api_key=args.api_key, concurrency=args.concurrency,
                                        retries=args.retries)
        result.extra["data"] = args.data
        return result

    if not args.compare:
        report = run(base).report()
        _print_table([("healing" if base.healing is not None else "sampling", report)])
        _print_steps(report)
    else:
        report = compare(run, base, healing_options(args))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    return 0


def compare(run, base: EvalSettings, heal: dict) -> dict:
    """Plain sampling (pass@1 averaged over 5 samples), healing (1 sample), and majority
    votes of 3 and 5 of those samples: same problems, same seeds, computed tokens per
    problem side by side."""
    import dataclasses

    from .evaluate import _majority_correct

    plain = run(dataclasses.replace(base, n=5, healing=None))
    healed = run(dataclasses.replace(base, n=1, healing=heal)).report()
    plain_report = plain.report()
    per_sample = plain_report["tokens_computed"] / 5
    rows = [("sampling", {**plain_report, "tokens_computed": per_sample}), ("healing", healed)]
    for k in (3, 5):
        maj = sum(_majority_correct(per[:k]) for per in plain.samples) / len(plain.samples)
        rows.append((f"majority@{k}", {**plain_report, "pass@1": maj, "maj@n": maj,
                                       "tokens_computed": per_sample * k}))
    _print_table(rows, reference=per_sample)
    return {"table": [{"method": name, "pass@1": r["pass@1"],
                       "tokens_computed": r["tokens_computed"],
                       "computed_ratio": r["tokens_computed"] / per_sample,
                       "erasures_per_sample": r["erasures_per_sample"]} for name, r in rows],
            "sampling": plain_report, "healing": healed}


def _print_table(rows, reference: float | None = None) -> None:
    ref = reference or rows[0][1]["tokens_computed"] or 1
    print(f"{'method':<12} {'pass@1':>8} {'maj@n':>8} {'computed':>10} {'x':>6} {'erasures':>9}")
    for name, r in rows:
        print(f"{name:<12} {100 * r['pass@1']:7.1f}% {100 * r['maj@n']:7.1f}% "
              f"{r['tokens_computed']:>10.0f} {r['tokens_computed'] / ref:6.2f} "
              f"{r['erasures_per_sample']:9.2f}")
    if len(rows) > 1:
        print("(pass@1 per sample; majority@k: the vote of the first k of the 5 plain samples;"
              " x: computed tokens relative to one plain sample)")


def _print_steps(report: dict) -> None:
    steps = report.get("step_analysis")
    if not steps:
        return
    print(f"steps: {steps['num_correct_steps']} correct, {steps['num_first_wrong_steps']} "
          "first wrong")
    for score in ("mean_nll", "max_nll", "mean_entropy"):
        s = steps[score]
        auroc = "n/a" if s["auroc"] is None else f"{s['auroc']:.3f}"
        print(f"  {score:<13} correct {s['correct_mean']} first-wrong {s['first_wrong_mean']} "
              f"AUROC {auroc}")


def run_calibrate(args) -> int:
    """Quantile of correct steps' scores per temperature, saved in the model directory."""
    import numpy as np

    from e3rl.engine import LLM
    from e3rl.engine.healer import CALIBRATION_FILE

    from .step_analysis import step_records

    problems = [p for p in _problems(args) if p.task == "arith"]
    if not problems:
        fail("calibration needs arith-chain problems (step labels)")
    llm = LLM(args.model)
    thresholds = {}
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        settings = EvalSettings(n=1, temperature=temperature, seed=args.seed,
                                max_tokens=args.max_tokens)
        from e3rl.engine import SamplingParams
        from .evaluate import sampling_options

        params = [SamplingParams(**sampling_options(settings, i)) for i in range(len(problems))]
        outs = llm.generate([p.prompt for p in problems], params, use_tqdm=True)
        scores = []
        for problem, out in zip(problems, outs):
            o = out.outputs[0]
            for ok, record in step_records(problem.question, o.text, o.token_ids, o.nll,
                                           o.entropy, llm.tokenizer):
                if ok:
                    scores.append(record[args.score] if args.score in record else None)
        scores = [s for s in scores if s is not None]
        if not scores:
            fail(f"no correct steps at temperature {temperature}")
        thresholds[f"{temperature:.2f}"] = float(np.quantile(scores, args.quantile))
        print(f"T={temperature}: {len(scores)} correct steps, p{100 * args.quantile:g} "
              f"{args.score} = {thresholds[f'{temperature:.2f}']:.4f}")
    path = Path(args.model) / CALIBRATION_FILE
    path.write_text(json.dumps({"score": args.score, "quantile": args.quantile,
                                "data": args.data, "thresholds": thresholds}, indent=2))
    print(f"wrote {path}")
    return 0
