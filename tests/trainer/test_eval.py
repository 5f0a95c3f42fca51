"""Evaluation harness: loaders, graders, AUROC, and in-process runs."""

import json
from pathlib import Path

import pytest

from e3rl.trainer.datasets import DataError, load_problems
from e3rl.trainer.evaluate import EvalSettings, evaluate_in_process
from e3rl.trainer.math_grading import grade_math
from e3rl.trainer.step_analysis import auroc, label_steps, step_records

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def test_math_verify_grader():
    assert grade_math("so the answer is $0.5$", "\\frac{1}{2}")
    assert grade_math("The answer is \\boxed{\\frac{1}{2}}", "0.5")
    assert grade_math("\\boxed{55}", "55")
    assert not grade_math("\\boxed{54}", "55")
    assert not grade_math("The answer is \\boxed{\\frac{1}{3}}", "\\frac{1}{2}")


def test_math_verify_off_the_main_thread():
    import threading

    results = []
    thread = threading.Thread(target=lambda: results.append(grade_math("\\boxed{2/4}", "0.5")))
    thread.start()
    thread.join()
    assert results == [True]


def test_loaders_read_deepmath_and_aime_layouts():
    deep = load_problems(str(EXAMPLES / "deepmath_sample.jsonl"))
    aime = load_problems(str(EXAMPLES / "aime_sample.jsonl"))
    assert len(deep) == 4 and deep[0].answer == "\\frac{1}{2}" and deep[0].task == "math"
    assert len(aime) == 3 and aime[0].answer == "24"
    arith = load_problems("arith-chain:test", limit=5)
    assert len(arith) == 5 and arith[0].task == "arith" and arith[0].prompt.startswith("Q: ")


def test_loaders_reject_missing_columns(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "1+1"}) + "\n")
    with pytest.raises(DataError, match="missing question column") as info:
        load_problems(str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="missing answer column 'gold'"):
        load_problems(str(EXAMPLES / "aime_sample.jsonl"), answer_column="gold")
    with pytest.raises(DataError, match="no such file"):
        load_problems(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="split"):
        load_problems("arith-chain:dev")


def test_auroc_and_step_labels():
    assert auroc([0.9, 0.8], [0.1, 0.2, 0.3]) == 1.0
    assert auroc([0.1], [0.9]) == 0.0
    assert auroc([0.5], [0.5]) == 0.5
    assert label_steps("47+38-19", "47+38=85\n85-19=67\nanswer: 67") == [True, False]


def test_step_records_align_tokens_with_lines():
    class CharTok:
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    text = "47+38=85\n85-19=67\nanswer: 67"
    ids = [ord(c) for c in text]
    nll = [0.1] * 9 + [2.0] * 9 + [0.0] * (len(ids) - 18)
    records = step_records("47+38-19", text, ids, nll, nll, CharTok())
    assert [ok for ok, _ in records] == [True, False]
    assert records[0][1]["mean_nll"] == pytest.approx(0.1)
    assert records[1][1]["max_nll"] == pytest.approx(2.0)


def test_in_process_eval_report(tiny_model):
    from e3rl.engine import LLM

    llm = LLM(tiny_model, num_kv_blocks=256)
    problems = load_problems("arith-chain:validation", limit=4)
    result = evaluate_in_process(llm, problems, EvalSettings(n=2, max_tokens=12))
    report = result.report()
    for key in ("pass@1", "maj@n", "tokens_returned", "tokens_computed", "erasures_per_sample",
                "num_problems"):
        assert key in report
    assert report["num_problems"] == 4 and len(result.samples[0]) == 2
    assert report["tokens_computed"] >= report["tokens_returned"] > 0
