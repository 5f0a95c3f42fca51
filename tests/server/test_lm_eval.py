"""lm-eval-harness, unmodified, against a live server: ``lm_eval --model local-completions``
on a generation task and a loglikelihood task shipped in ``lm_eval_tasks/``, using the
server's own tokenizer endpoints. Its scores (and every per-sample answer) must equal an
in-process computation with Hugging Face transformers on the same model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
MAX_GEN_TOKENS = 8  # as in e3rl_tiny_gen.yaml


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def lm_eval_run(live, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("lm_eval_out")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("hf_datasets")),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    model_args = (f"model=tiny,base_url={live.url}/v1/completions,num_concurrent=1,"
                  "max_retries=1,tokenized_requests=True,max_length=512")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions",
           "--model_args", model_args, "--tasks", "e3rl_tiny_gen,e3rl_tiny_mc",
           "--include_path", str(TASKS_DIR), "--output_path", str(out_dir), "--log_samples"]
    # cwd: the task YAMLs name their data files relative to their own folder.
    result = subprocess.run(cmd, cwd=TASKS_DIR, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "remote tokenizer" in result.stderr  # it found /tokenizer_info and /tokenize
    [results_file] = out_dir.rglob("results_*.json")
    samples = {}
    for task in ("e3rl_tiny_gen", "e3rl_tiny_mc"):
        [path] = out_dir.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted(_read_jsonl(path), key=lambda s: s["doc_id"])
    return json.loads(results_file.read_text())["results"], samples


@pytest.fixture(scope="module")
def hf(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(tiny_model)


def _hf_answer(model, tokenizer, question: str) -> str:
    """Greedy, at most MAX_GEN_TOKENS, stopped by EOS or a newline (the task's `until`)."""
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_GEN_TOKENS, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    return text.split("\n")[0]


@torch.no_grad()
def _hf_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [T, V]
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(len(ctx), len(ids)))


def test_generation_task_matches_in_process(lm_eval_run, hf):
    results, samples = lm_eval_run
    model, tokenizer = hf
    docs = _read_jsonl(TASKS_DIR / "tiny_gen.jsonl")
    answers = [_hf_answer(model, tokenizer, d["question"]) for d in docs]
    assert [s["filtered_resps"][0] for s in samples["e3rl_tiny_gen"]] == answers
    expected = sum(a == d["answer"] for a, d in zip(answers, docs)) / len(docs)
    assert results["e3rl_tiny_gen"]["exact_match,none"] == pytest.approx(expected)
    assert expected > 0  # the data holds some of the model's own answers


def test_loglikelihood_task_matches_in_process(lm_eval_run, hf):
    results, samples = lm_eval_run
    model, tokenizer = hf
    docs = _read_jsonl(TASKS_DIR / "tiny_mc.jsonl")
    correct = 0
    for doc, sample in zip(docs, samples["e3rl_tiny_mc"]):
        ours = [_hf_loglikelihood(model, tokenizer, doc["question"], " " + c)
                for c in doc["choices"]]
        served = [float(r[0]) for r in sample["filtered_resps"]]
        assert served == pytest.approx(ours, abs=1e-4)
        correct += max(range(len(ours)), key=ours.__getitem__) == doc["label"]
    assert results["e3rl_tiny_mc"]["acc,none"] == pytest.approx(correct / len(docs))
