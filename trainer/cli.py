"""The ``e3rl data`` and ``e3rl train`` subcommands.

The ``e3rl`` console script calls `register` with its subparsers; each leaf parser sets
``func``, a handler ``(args) -> int`` that returns the exit status. Bad input gives a one-line
``e3rl: error: ...`` on stderr and exit status 2. ``python -m e3rl.trainer.cli`` runs the same
subcommands without the rest of the console script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .arith import SPLITS, TASK_NAME, ArithConfig, default_config, generate_rows
from .config import SftConfig

logger = logging.getLogger(__name__)

_TYPES = {"int": int, "float": float, "str": str}


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: str) -> NoReturn:
    """Print ``e3rl: error: MESSAGE`` (one line) and exit with status 2."""
    sys.stderr.write(f"e3rl: error: {' '.join(str(message).split())}\n")
    raise SystemExit(2)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data``, ``train``, ``eval`` and ``calibrate`` to the console script's
    subcommands."""
    data = subparsers.add_parser("data", help="Write a task's data set as JSONL.")
    tasks = data.add_subparsers(dest="task", metavar="TASK", required=True,
                                parser_class=OneLineArgumentParser)
    arith = tasks.add_parser(TASK_NAME, help="Multi-step arithmetic with worked solutions.",
                             description="Rows: question, final_answer, difficulty, solution "
                                         "(DeepMath-103K layout plus the worked solution).")
    arith.add_argument("--split", choices=SPLITS, required=True,
                       help="Which split (decided by a hash of each problem, never by seed).")
    arith.add_argument("--seed", type=int, default=0, help="Which sample of the split to draw.")
    arith.add_argument("--num", type=int, required=True, help="Number of distinct problems.")
    arith.add_argument("--out", required=True, help="Output JSONL file.")
    arith.add_argument("--min-steps", type=int, help="Fewest steps (default 2; hard: 6).")
    arith.add_argument("--max-steps", type=int, help="Most steps (default 5; hard: 8).")
    arith.add_argument("--digits", type=int, help="Digits of each +/- operand (default 2).")
    arith.add_argument("--operators", help="Operators, a subset of '+-*' (default '+-').")
    arith.set_defaults(func=run_data_arith)

    train = subparsers.add_parser("train", help="Train a model.")
    methods = train.add_subparsers(dest="method", metavar="METHOD", required=True,
                                   parser_class=OneLineArgumentParser)
    sft = methods.add_parser("sft", help="Supervised warm start on arith-chain (CPU).",
                             description=(SftConfig.__doc__ or "").strip(),
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_arguments(sft, SftConfig, required=("out_dir",))
    sft.set_defaults(func=run_train_sft)
    from . import eval_cli, rl_cli

    rl_cli.register(methods)

    eval_cli.register(subparsers)


def add_config_arguments(parser: argparse.ArgumentParser, config_type: type,
                         required: Sequence[str] = ()) -> None:
    """One ``--field-name`` option per dataclass field, with the field's help text."""
    for f in dataclasses.fields(config_type):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_TYPES[f.type],
                                required=f.name in required,
                                default=None if f.name in required else f.default,
                                help=help_text)


def _setup_logging() -> None:
    """INFO to stderr, unless the caller already configured logging (then a no-op)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")


def run_data_arith(args: argparse.Namespace) -> int:
    """Handler of ``e3rl data arith-chain``."""
    _setup_logging()
    if args.num < 1:
        fail(f"--num must be >= 1, got {args.num}")
    knobs = {name: getattr(args, name) for name in ("min_steps", "max_steps", "digits",
                                                    "operators")
             if getattr(args, name) is not None}
    try:
        config = ArithConfig(**{**dataclasses.asdict(default_config(args.split)), **knobs})
        rows = generate_rows(args.split, args.num, args.seed, config)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    except (ValueError, OSError) as exc:
        fail(str(exc))
    logger.info("wrote %d %s %s problems (seed %d) to %s", len(rows), TASK_NAME, args.split,
                args.seed, out)
    return 0


def run_train_sft(args: argparse.Namespace) -> int:
    """Handler of ``e3rl train sft``."""
    _setup_logging()
    from .sft import train_sft  # torch and transformers load only when training

    names = [f.name for f in dataclasses.fields(SftConfig)]
    try:
        config = SftConfig(**{name: getattr(args, name) for name in names})
        result = train_sft(config)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    logger.info("trained %d parameters in %.0f s: final loss %.4f, validation %s",
                result.num_params, result.wall_s, result.final_loss,
                {k: round(v, 4) for k, v in result.final_eval.items()
                 if k.startswith("val_")})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point with only the data and train subcommands."""
    parser = OneLineArgumentParser(prog="e3rl")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
