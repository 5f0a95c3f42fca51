"""The arith-chain lm-eval task (examples/lm_eval) scores a live server on the bundled model
exactly as the project's own grader does in-process."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from e3rl.engine import LLM
from e3rl.server.app import create_app
from e3rl.server.settings import DEFAULT_MODEL_PATH, Settings
from e3rl.trainer.datasets import load_problems
from e3rl.trainer.evaluate import EvalSettings, evaluate_in_process
from tests.server.conftest import DATA_ROOT, ENGINE_OPTIONS, LiveServer

TASK_DIR = Path(__file__).resolve().parents[2] / "examples" / "lm_eval"
LIMIT = 12


def test_lm_eval_arith_task_matches_in_process(tmp_path):
    settings = Settings(**ENGINE_OPTIONS, data_dir=tempfile.mkdtemp(dir=DATA_ROOT))
    server = LiveServer(create_app(settings))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    args = (f"model=arith-chain,base_url={server.url}/v1/completions,num_concurrent=4,"
            "max_retries=1,tokenized_requests=False")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             args, "--tasks", "arith_chain", "--include_path", str(TASK_DIR), "--limit",
             str(LIMIT), "--output_path", str(tmp_path / "out")],
            cwd=TASK_DIR, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    [results_file] = (tmp_path / "out").rglob("results_*.json")
    score = json.loads(results_file.read_text())["results"]["arith_chain"]
    rows = [json.loads(line) for line in
            (TASK_DIR / "arith_chain_test.jsonl").read_text().splitlines()[:LIMIT]]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = evaluate_in_process(LLM(DEFAULT_MODEL_PATH, **ENGINE_OPTIONS),
                                load_problems(str(path)), EvalSettings(temperature=0.0,
                                                                       max_tokens=128))
    assert score["exact_match,final_answer"] == local.report()["pass@1"]
