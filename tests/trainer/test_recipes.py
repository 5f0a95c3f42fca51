"""The shipped recipes parse, and run one step on CPU with a tiny random model and the
DeepMath / AIME samples."""

from __future__ import annotations

import argparse
from pathlib import Path

from e3rl.trainer.rl_cli import config_from_args, register

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "examples" / "recipes" / "qwen3-4b-deepmath.yaml"


def parse(*args: str):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return config_from_args(parser.parse_args(["rl", *args]))


def test_recipe_parses_as_written():
    config = parse("--config", str(RECIPE))
    assert (config.algo, config.device, config.dtype) == ("e3rl", "cuda", "bfloat16")
    assert config.segment_weights and config.erasure_learning == "fork"
    assert "{question}" in config.prompt_template


def test_recipe_smoke_on_a_tiny_model(tmp_path, tiny_model):
    from e3rl.trainer.checkpoint import META_FILE
    from e3rl.trainer.trainer import train_rl

    config = parse("--config", str(RECIPE), "--model", str(tiny_model),
                   "--output-dir", str(tmp_path / "run"),
                   "--dataset", str(ROOT / "examples/data/deepmath_sample.jsonl"),
                   "--eval-data", str(ROOT / "examples/data/aime_sample.jsonl"),
                   "--device", "cpu", "--dtype", "float32", "--kv-cache-memory-gb", "0.05",
                   "--group-size", "2", "--prompts-per-step", "2", "--max-tokens", "8",
                   "--max-steps", "1", "--micro-batch-size", "2", "--no-dynamic-sampling",
                   "--num-threads", "1", "--no-progress")
    result = train_rl(config)
    assert result.steps == 1 and result.sampled_tokens > 0
    assert (result.final_dir / META_FILE).is_file()
    assert {"greedy_pass@1", "sampled_pass@1"} <= set(result.last_eval)
