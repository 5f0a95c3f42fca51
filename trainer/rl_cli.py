"""``e3rl train rl`` and ``e3rl train plot``: argument parsing and handlers.

``e3rl train rl`` takes every `RLConfig` field as a flag, or a YAML file of them with
``--config FILE.yaml``; flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from .config import FollowConfig, RLConfig

logger = logging.getLogger(__name__)

_TYPES = {"int": int, "float": float, "str": str, "str | None": str}


def register(methods: argparse._SubParsersAction) -> None:
    """Add ``rl`` and ``plot`` under ``e3rl train``."""
    rl = methods.add_parser("rl", help="Reinforcement learning: GRPO or E3RL.",
                            description=(RLConfig.__doc__ or "").strip())
    rl.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                    help="YAML file of the options below (flags override it).")
    for f in dataclasses.fields(RLConfig):
        _add_field(rl, f)
    rl.set_defaults(func=run_train_rl)
    follow = methods.add_parser(
        "follow", help="Learn from live servers' traffic and hot-swap their weights.",
        description=(FollowConfig.__doc__ or "").strip() + " The admin key comes from "
        "E3RL_ADMIN_KEY.")
    follow.add_argument("--server", dest="servers", action="append", metavar="URL",
                        default=argparse.SUPPRESS, help="A server to follow (repeatable).")
    for f in dataclasses.fields(FollowConfig):
        if f.name == "servers":
            continue
        _add_field(follow, f)
    follow.set_defaults(func=run_train_follow)
    plot = methods.add_parser("plot", help="Plot pass@1, reward and erasure rate of RL runs "
                                           "against sampled tokens.")
    plot.add_argument("logs", nargs="+", metavar="LOG", help="train_log.jsonl files.")
    plot.add_argument("--out", required=True, help="PNG file to write.")
    plot.add_argument("--labels", help="Comma-separated labels, one per log (default: the "
                                       "run directory names).")
    plot.set_defaults(func=run_train_plot)


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """A dataclass field as a flag (booleans as --x / --no-x); unset flags stay absent."""
    flag = "--" + f.name.replace("_", "-")
    help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
    if f.type in ("bool", "bool | None"):
        parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=help_text)
    else:
        parser.add_argument(flag, dest=f.name, type=_TYPES[f.type],
                            default=argparse.SUPPRESS, help=help_text)


def config_from_args(args: argparse.Namespace) -> RLConfig:
    """The `RLConfig` of the YAML file (if any) overridden by the flags given."""
    values: dict = {}
    if getattr(args, "config", None):
        values = _read_yaml(Path(args.config))
    names = {f.name for f in dataclasses.fields(RLConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return RLConfig(**values)


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of RLConfig options")
    names = {f.name for f in dataclasses.fields(RLConfig)}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return data


def run_train_rl(args: argparse.Namespace) -> int:
    """Handler of ``e3rl train rl``."""
    from .cli import _setup_logging, fail

    _setup_logging()
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    from e3rl.engine import EngineError

    from .datasets import DataError
    from .trainer import train_rl  # torch and transformers load only when training

    try:
        result = train_rl(config)
    except (ValueError, OSError, DataError, EngineError) as exc:
        fail(str(exc))
    logger.info("done: %d steps, %d sampled tokens, final model in %s; last eval %s",
                result.steps, result.sampled_tokens, result.final_dir,
                {k: round(v, 4) for k, v in result.last_eval.items() if k.endswith("pass@1")})
    return 0


def run_train_follow(args: argparse.Namespace) -> int:
    """Handler of ``e3rl train follow``."""
    import os

    from .cli import _setup_logging, fail

    _setup_logging()
    names = {f.name for f in dataclasses.fields(FollowConfig)}
    try:
        config = FollowConfig(**{k: v for k, v in vars(args).items() if k in names})
    except (ValueError, TypeError) as exc:
        fail(str(exc))
    admin_key = os.environ.get("E3RL_ADMIN_KEY", "")
    if not admin_key:
        fail("set E3RL_ADMIN_KEY to the servers' admin key (the trainer pulls and pushes "
             "through their admin routes)")
    from .fleet import ReplicaError
    from .follow import follow

    try:
        state = follow(config, admin_key)
    except (ValueError, OSError, ReplicaError) as exc:
        fail(str(exc))
    logger.info("stopped at update %d; serving version %s (%s)", state.update, state.version,
                state.serving)
    return 0


def run_train_plot(args: argparse.Namespace) -> int:
    """Handler of ``e3rl train plot``."""
    from .cli import _setup_logging, fail
    from .plot import plot_runs

    _setup_logging()
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.logs):
        fail(f"--labels has {len(labels)} names for {len(args.logs)} logs")
    try:
        out = plot_runs([Path(p) for p in args.logs], Path(args.out), labels)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    logger.info("wrote %s", out)
    return 0
