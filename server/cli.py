"""The ``e3rl`` command: ``e3rl serve`` here; ``data``, ``train``, ``eval`` and
``calibrate`` come from ``e3rl.trainer.cli``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pydantic import ValidationError

from .settings import DEFAULT_MODEL_NAME, Settings
from .trajectory_schema import TrajectoryStoreError, check_file

def json_object(text: str) -> dict:
    """An argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"invalid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


# Command-line flags of `e3rl serve` -> (Settings field, type, help). Every setting can also
# come from its environment variable, E3RL_<FIELD> (E3RL_API_KEY, E3RL_PORT, ...).
SERVE_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, f"model directory (default: bundled models/{DEFAULT_MODEL_NAME})"),
    ("--served-model-name", "served_model_name", str, "name clients use in 'model'"),
    ("--host", "host", str, "bind address (default 127.0.0.1)"),
    ("--port", "port", int, "bind port (default 8000)"),
    ("--dtype", "dtype", str, "auto | float32 | bfloat16 | float16"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--kv-cache-memory-gb", "kv_cache_memory_gb", float, "KV cache budget in GiB"),
    ("--num-kv-blocks", "num_kv_blocks", int, "KV blocks (overrides the memory budget)"),
    ("--block-size", "block_size", int, "tokens per KV block"),
    ("--max-num-seqs", "max_num_seqs", int, "sequences running at once"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "token budget of one step"),
    ("--max-model-len", "max_model_len", int, "context length (default: the model's)"),
    ("--max-waiting", "max_waiting", int, "waiting-queue size; past it: 503"),
    ("--num-threads", "num_threads", int, "torch CPU threads (default: cores - 1)"),
    ("--seed", "seed", int, "seed of unseeded requests' random streams"),
    ("--attention-backend", "attention_backend", str, "decode attention: auto | native | sdpa"),
    ("--model-impl", "model_impl", str, "the model's forward: auto | e3rl | transformers"),
    ("--admin-port", "admin_port", int, "serve the admin and trajectory routes (and /health) "
     "on this second port only; the main port answers them 404 (default: one port)"),
    ("--drain-timeout-s", "drain_timeout_s", float, "on SIGTERM: how long running requests "
     "may take to finish before they are aborted (default 30)"),
    ("--api-key", "api_key", str, "require 'Authorization: Bearer KEY' (env E3RL_API_KEY)"),
    ("--max-request-bytes", "max_request_bytes", int, "largest request body (413 above)"),
    ("--log-level", "log_level", str, "debug | info | warning | error"),
    ("--data-dir", "data_dir", str, "trajectory store directory (default ./e3rl-data)"),
    ("--store", "store", str, "trajectories to store: all | erasures | none (default all)"),
    ("--store-retention-rows", "store_retention_rows", int, "keep at most N newest "
     "trajectories"),
    ("--store-retention-age-s", "store_retention_age_s", float, "delete trajectories older "
     "than S seconds"),
    ("--store-max-rows", "store_max_rows", int, "hard cap on stored trajectories, "
     "acknowledged or not (evictions are counted)"),
    ("--store-max-queue", "store_max_queue", int, "store writer queue bound; past it "
     "records are dropped and counted"),
    ("--store-wait-s", "store_wait_s", float, "longest a response waits for its "
     "trajectory's commit (default 5)"),
    ("--store-synchronous", "store_synchronous", str, "SQLite synchronous: FULL | NORMAL"),
    ("--admin-key", "admin_key", str, "key of the admin routes (env E3RL_ADMIN_KEY); unset: "
     "admin routes are off"),
    ("--checkpoint-dir", "checkpoint_dir", str, "directory weight updates must load from"),
    ("--max-upload-bytes", "max_upload_bytes", int, "largest uploaded checkpoint file (413 "
     "above; default: the model's parameter bytes + 16 MiB)"),
    ("--healing", "healing", json_object, "server-wide self-healing defaults as JSON for all "
     "requests, e.g. '{\"enabled\": true}' or '{\"enabled\": false}' (requests override "
     "them; default: sampled requests heal if the model ships e3rl_healing.json, else off)"),
]


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a model over an OpenAI-compatible HTTP API. "
                              "Every option also reads E3RL_<NAME> from the environment.")
    for flag, dest, type_, help_ in SERVE_FLAGS:
        p.add_argument(flag, dest=dest, type=type_, default=None, help=help_)
    p.add_argument("--metrics-require-auth", dest="metrics_require_auth", action="store_true",
                   default=None, help="protect /metrics with the API key")
    p.add_argument("--enable-prefix-caching", dest="enable_prefix_caching",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="automatic prefix caching (default: off; E3RL_ENABLE_PREFIX_CACHING)")
    p.add_argument("--engine-process", dest="engine_process",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine loop in its own process (default: on; "
                   "E3RL_ENGINE_PROCESS)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false", default=None,
                   help="no per-request log lines")
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    from . import runner
    from .app import create_app
    from .upload import remove_stale_uploads

    given = {dest: getattr(args, dest) for _, dest, _, _ in SERVE_FLAGS}
    given["metrics_require_auth"] = args.metrics_require_auth
    given["access_log"] = args.access_log
    given["enable_prefix_caching"] = args.enable_prefix_caching
    given["engine_process"] = args.engine_process
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
        settings.check_model()
        check_file(settings.store_path)  # a damaged store: refused before the model loads
    except (ValidationError, FileNotFoundError, TrajectoryStoreError) as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            if field:
                message = f"--{field.replace('_', '-')}: {first['msg']}"
            else:  # a check across fields says which flags it concerns
                message = first["msg"].removeprefix("Value error, ")
        else:
            message = str(exc)
        sys.stderr.write(f"e3rl: error: {message}\n")  # one line, as argparse does
        raise SystemExit(2) from None
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.checkpoint_dir is not None and settings.checkpoint_dir.is_dir():
        remove_stale_uploads(settings.checkpoint_dir)  # left by a server killed mid-upload
    runner.run_app(create_app(settings), settings)  # returns once SIGTERM has drained it
    return 0


def build_parser() -> argparse.ArgumentParser:
    from e3rl.trainer import cli as trainer_cli  # data, train, eval, calibrate

    # Every parser reports a bad argument as one line (`e3rl: error: ...`) and exits with 2.
    one_line = trainer_cli.OneLineArgumentParser
    parser = one_line(prog="e3rl", description="e3rl: a self-healing LLM serving engine and "
                      "the E3RL trainer.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                       parser_class=one_line)
    add_serve_parser(subparsers)
    trainer_cli.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
