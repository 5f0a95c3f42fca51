"""A 2-step SFT smoke run on a tiny config: finite loss, every parameter moves, files written."""

from __future__ import annotations

import json
import math

import torch
from transformers import AutoModelForCausalLM

from e3rl.engine.model_factory import build_random_model
from e3rl.trainer.config import SftConfig
from e3rl.trainer.sft import lr_factor, train_sft
from e3rl.trainer.sft_data import IGNORE_INDEX, build_arith_tokenizer, collate, encode_example
from e3rl.trainer.arith import format_prompt, solve

TINY = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
            max_position_embeddings=128, batch_size=8, num_eval_problems=8, num_threads=1,
            progress=False)


def test_loss_covers_the_solution_only():
    tok = build_arith_tokenizer()
    problem = solve("12+34-5")
    ids, labels = encode_example(tok, problem.question, problem.solution)
    num_prompt = len(format_prompt(problem.question))
    assert labels[:num_prompt] == [IGNORE_INDEX] * num_prompt
    assert labels[num_prompt:] == ids[num_prompt:]
    assert ids[-1] == tok.eos_token_id
    batch = collate(tok, [problem, solve("1+2")])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_two_steps_change_every_parameter(tmp_path):
    config = SftConfig(out_dir=str(tmp_path / "out"), num_steps=2, warmup_steps=0, **TINY)
    init = build_random_model(tmp_path / "init", config.model_config(), seed=0,
                              tokenizer=build_arith_tokenizer())
    config.init_from = str(init)
    result = train_sft(config)
    assert math.isfinite(result.final_loss)
    before = AutoModelForCausalLM.from_pretrained(init, local_files_only=True)
    after = AutoModelForCausalLM.from_pretrained(result.out_dir, local_files_only=True)
    after_params = dict(after.named_parameters())
    for name, param in before.named_parameters():
        assert not torch.equal(param, after_params[name]), f"{name} did not change"
    records = [json.loads(line) for line in (result.out_dir / "train_log.jsonl").open()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if r["event"] == "train")
    assert (result.out_dir / "loss_curve.png").stat().st_size > 1000
    assert (result.out_dir / "model.safetensors").is_file()
    assert (result.out_dir / "tokenizer.json").is_file()


def test_same_seed_same_run(tmp_path):
    losses = []
    for name in ("a", "b"):
        result = train_sft(SftConfig(out_dir=str(tmp_path / name), num_steps=2, seed=5,
                                     eval_every=0, **TINY))
        losses.append(result.final_loss)
    assert losses[0] == losses[1]


def test_constant_lr_after_warmup_by_default():
    config = SftConfig(out_dir="x", num_steps=100, warmup_steps=10)
    assert lr_factor(0, config) == 0.1
    assert lr_factor(10, config) == lr_factor(99, config) == 1.0
    decayed = SftConfig(out_dir="x", num_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert abs(lr_factor(100, decayed) - 0.1) < 1e-9
