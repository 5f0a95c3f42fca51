"""The bundled model: served by default, solves held-out problems in the documented format,
and evaluates the same in-process and through a live server."""

import json
import re
import tempfile

import pytest
from fastapi.testclient import TestClient

from e3rl.server.app import create_app
from e3rl.server.cli import main as e3rl_main
from e3rl.server.settings import DEFAULT_MODEL_PATH, Settings
from e3rl.trainer.datasets import load_problems
from e3rl.trainer.evaluate import EvalSettings, evaluate_in_process, evaluate_over_http
from tests.server.conftest import DATA_ROOT, ENGINE_OPTIONS, LiveServer

STEP = re.compile(r"^\d+[+\-*]\d+=-?\d+$")


@pytest.fixture(scope="module")
def default_settings():
    # No model given: the server's default is the bundled model.
    return Settings(**ENGINE_OPTIONS, data_dir=tempfile.mkdtemp(dir=DATA_ROOT))


def test_default_server_model_is_the_bundled_one(default_settings):
    assert default_settings.model_path == DEFAULT_MODEL_PATH
    assert (DEFAULT_MODEL_PATH / "model.safetensors").is_file()
    problem = load_problems("arith-chain:test", limit=1)[0]
    with TestClient(create_app(default_settings)) as client:
        body = client.post("/v1/completions", json={
            "prompt": problem.prompt, "max_tokens": 128, "temperature": 0}).json()
    text = body["choices"][0]["text"]
    lines = text.strip().split("\n")
    assert lines[-1].startswith("answer: ")
    assert all(STEP.match(line) for line in lines[:-1]), text
    assert body["model"] == "arith-chain"


def test_greedy_eval_over_http_equals_in_process(default_settings):
    from e3rl.engine import LLM

    problems = load_problems("arith-chain:test", limit=40)
    settings = EvalSettings(temperature=0.0, max_tokens=128)
    local = evaluate_in_process(LLM(DEFAULT_MODEL_PATH, **ENGINE_OPTIONS), problems, settings)
    server = LiveServer(create_app(default_settings))
    try:
        remote = evaluate_over_http(server.url, None, problems, settings, concurrency=8)
    finally:
        server.stop()
    assert remote.report()["pass@1"] == local.report()["pass@1"]
    assert [s[0].text for s in remote.samples] == [s[0].text for s in local.samples]
    assert 0.5 < local.report()["pass@1"] < 1.0


def test_eval_cli_writes_the_report(tmp_path):
    report = tmp_path / "r.json"
    assert e3rl_main(["eval", "--model", str(DEFAULT_MODEL_PATH), "--data", "arith-chain:test",
                      "--limit", "8", "--n", "2", "--max-tokens", "96", "--healing", "on",
                      "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    for key in ("pass@1", "maj@n", "tokens_returned", "tokens_computed", "erasures_per_sample",
                "num_problems", "temperature", "n", "step_analysis"):
        assert key in data
    assert data["num_problems"] == 8 and data["n"] == 2
    assert data["tokens_computed"] >= data["tokens_returned"]


def test_eval_cli_rejects_missing_columns_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "1+1", "a": "2"}) + "\n")
    with pytest.raises(SystemExit) as info:
        e3rl_main(["eval", "--model", str(DEFAULT_MODEL_PATH), "--data", str(bad)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "missing question column" in err and err.count("\n") == 1
