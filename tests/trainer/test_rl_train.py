"""End-to-end RL training on the bundled model: behaviour log-probs, one update, resume after
a kill, torchrun data parallelism, the CLI. Runs are tiny (a few prompts, a few steps)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from e3rl.trainer.config import RLConfig

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "models" / "arith-chain"
E3RL = Path(sys.executable).parent / "e3rl"

SMALL = dict(model=str(BUNDLED), group_size=4, prompts_per_step=3, max_tokens=64,
             eval_problems=8, eval_every=0, checkpoint_every=0, progress=False,
             num_threads=1, kv_cache_memory_gb=0.1)


def small_config(tmp_path: Path, name: str = "run", **changes) -> RLConfig:
    return RLConfig(**{**SMALL, "output_dir": str(tmp_path / name), **changes})


def cli_args(config: dict) -> list[str]:
    args = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args


def final_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


def test_engine_logprobs_equal_the_trainer_forward_with_healing(tmp_path):
    """Behaviour log-probs logged by the engine (healing on, many erasures) equal a fresh
    fp32 forward of the trainer's model on the same tokens within 1e-4."""
    from transformers import AutoModelForCausalLM

    from e3rl.engine import LLM
    from e3rl.trainer.actor import batch_log_probs, collate
    from e3rl.trainer.credit import TrainRow
    from e3rl.trainer.prompts import PromptStream
    from e3rl.trainer.rollout import sample_groups

    llm = LLM(str(BUNDLED), dtype="float32", kv_cache_memory_gb=0.1, num_threads=1)
    problems = PromptStream("arith-chain", seed=3).take(6)
    # A low fixed threshold erases often; the budgets keep the outputs finite.
    healing = {"threshold": 0.01, "max_erasures": 4, "max_erased_fraction": 0.5}
    groups = sample_groups(llm, problems, 4, temperature=1.0, max_tokens=64,
                           seeds=list(range(6)), group_ids=list(range(6)), healing=healing)
    episodes = [e for g in groups for e in g]
    assert sum(len(e.erasures) for e in episodes) >= 20
    model = AutoModelForCausalLM.from_pretrained(BUNDLED, local_files_only=True,
                                                 dtype=torch.float32)
    rows = [TrainRow(e.prompt_ids, e.output_ids, e.logprobs, [0.0] * len(e.output_ids),
                     [1] * len(e.output_ids), e.versions) for e in episodes]
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        logp = batch_log_probs(model, batch, temperature=1.0)
    gap = ((logp - batch.old_logprobs).abs() * batch.mask).max().item()
    assert gap < 1e-4, gap


def test_one_update_changes_every_parameter(tmp_path):
    from e3rl.trainer.trainer import Trainer

    trainer = Trainer(small_config(tmp_path))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    record = trainer.train_step()
    assert record["informative_groups"] >= 1 and record["num_loss_tokens"] > 0
    unchanged = [n for n, p in trainer.model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []
    # The engine now serves the new weights, as version 1.
    assert trainer.llm.weight_version == "1"
    engine_params = dict(trainer.llm.engine.runner.model.named_parameters())
    for name, p in trainer.model.named_parameters():
        assert torch.equal(engine_params[name].detach(), p.detach()), name


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL a run once it has written the step-2 checkpoint; --resume finishes it with
    the same parameters as a run that was never interrupted (fp32, CPU, fixed seed)."""
    from e3rl.trainer.trainer import Trainer

    options = {**SMALL, "max_steps": 4, "checkpoint_every": 1, "seed": 5}
    Trainer(RLConfig(**options, output_dir=str(tmp_path / "straight"))).run()

    killed = tmp_path / "killed"
    proc = subprocess.Popen([str(E3RL), "train", "rl",
                             *cli_args({**options, "output_dir": str(killed)})],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (killed / "checkpoints" / "step-000002").is_dir():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (killed / "final").exists()
    Trainer(RLConfig(**options, output_dir=str(killed), resume=True)).run()

    straight, resumed = final_tensors(tmp_path / "straight"), final_tensors(killed)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    steps = [line for line in (killed / "train_log.jsonl").read_text().splitlines()
             if '"event": "train"' in line]
    assert len(steps) == 4  # steps re-run after the checkpoint are not logged twice


@pytest.mark.timeout(600)
def test_two_gloo_ranks_equal_one_rank(tmp_path):
    """torchrun --nproc-per-node 2 (gloo) trains on the same global batch as one process."""
    options = {**SMALL, "prompts_per_step": 4, "max_steps": 2, "seed": 7}
    one = tmp_path / "one"
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(E3RL), "train", "rl", *cli_args({**options, "output_dir": str(one)})],
                   check=True, env=env, capture_output=True)
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(E3RL),
                             "train", "rl", *cli_args({**options, "output_dir": str(two)})],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = final_tensors(one), final_tensors(two)
    start = load_file(str(BUNDLED / "model.safetensors"))
    moved = max((a[n] - start[n]).abs().max().item() for n in a)
    assert moved > 1e-5  # the runs did train
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5, msg=name)


def test_checkpoint_is_a_servable_model_dir(tmp_path):
    from e3rl.engine import LLM, SamplingParams
    from e3rl.trainer.checkpoint import META_FILE
    from e3rl.trainer.trainer import Trainer

    result = Trainer(small_config(tmp_path, max_steps=1)).run()
    meta = (result.final_dir / META_FILE).read_text()
    assert '"algo": "grpo"' in meta and '"version": "1"' in meta
    llm = LLM(str(result.final_dir), dtype="float32", kv_cache_memory_gb=0.1)
    out = llm.generate("Q: 47+38-19+56\nA:\n", SamplingParams(temperature=0, max_tokens=64))
    assert "answer:" in out[0].outputs[0].text
    assert (result.final_dir / "e3rl_healing.json").is_file()  # healing stays calibrated
    llm.update_weights(str(result.final_dir), "2")  # what POST /v1/admin/weights loads
    assert llm.weight_version == "2"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(E3RL), "train", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["--algo", "grpo", "--segment-weights"], "algo=grpo runs with every E3RL component off"),
    (["--algo", "e3rl", "--erasure-learning", "pairs"], "only healed rollouts produce"),
    (["--group-size", "1"], "group_size must be >= 2"),
    (["--healing", "{not json"], "healing is not valid JSON"),
])
def test_cli_refuses_bad_combinations_in_one_line(tmp_path, args, message):
    result = _run_cli("rl", "--model", str(BUNDLED), "--output-dir", str(tmp_path / "x"), *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("e3rl: error:") and message in lines[0]


def test_cli_config_file_and_flag_override(tmp_path):
    from e3rl.trainer.rl_cli import config_from_args, register
    import argparse

    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: {BUNDLED}\noutput_dir: {tmp_path / 'out'}\nalgo: e3rl\n"
                           "group_size: 6\nlr: 0.0002\n")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["rl", "--config", str(config_file), "--group-size", "4"])
    config = config_from_args(args)
    assert (config.algo, config.group_size, config.lr) == ("e3rl", 4, 0.0002)
    config_file.write_text("model: m\noutput_dir: o\nbogus_option: 1\n")
    result = _run_cli("rl", "--config", str(config_file))
    assert result.returncode == 2 and "unknown option(s) bogus_option" in result.stderr


def test_existing_run_needs_resume(tmp_path):
    from e3rl.trainer.trainer import Trainer

    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="pass --resume"):
        Trainer(small_config(tmp_path))


def test_every_sampled_token_is_counted_once_with_forks(tmp_path):
    """The budget counts each token the engine drew exactly once: every fork branch
    (trained on or not), and a group that a fork rescues from the dropped ones not twice."""
    from e3rl.trainer.trainer import Trainer

    trainer = Trainer(small_config(tmp_path, algo="e3rl", seed=1, fork_max_per_step=12))
    rescued = 0
    for _ in range(2):
        drawn = trainer.llm.engine.num_generation_tokens
        before = trainer.sampled_tokens
        record = trainer.train_step()
        rescued += record["rescued_groups"]
        assert record["num_forks"] > 0
        assert trainer.sampled_tokens - before == trainer.llm.engine.num_generation_tokens - drawn
    assert rescued >= 1  # the case the count once got wrong did happen
