"""Greedy completions over HTTP equal the offline engine's, which equal Hugging Face
``generate``, token for token, for every tiny test architecture."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from e3rl.engine import LLM, SamplingParams
from e3rl.server.app import create_app
from tests.conftest import ARCHS

from tests.conftest import hf_greedy

from .conftest import ENGINE_OPTIONS, make_engine, make_settings

PROMPTS = ["The quick brown fox", "1+1=", "def f(x):\n    return", "Z"]
MAX_TOKENS = 16


@pytest.mark.parametrize("arch", ARCHS)
def test_http_equals_engine_equals_hf(arch, tiny_model_dirs):
    path = tiny_model_dirs[arch]
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    settings = make_settings(path)
    engine = make_engine(settings)
    try:
        with TestClient(create_app(settings, engine=engine)) as client:
            r = client.post("/v1/completions", json={
                "prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "logprobs": 0})
            assert r.status_code == 200, r.text
            choices = r.json()["choices"]
    finally:
        engine.shutdown()
    http_ids = [tokenizer.convert_tokens_to_ids(c["logprobs"]["tokens"]) for c in choices]

    llm = LLM(str(path), **{k: v for k, v in ENGINE_OPTIONS.items() if k != "num_threads"})
    offline = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                   ignore_eos=True))
    hf = hf_greedy(path, prompt_ids, MAX_TOKENS)

    assert http_ids == [o.outputs[0].token_ids for o in offline] == hf
    assert [c["text"] for c in choices] == [o.outputs[0].text for o in offline] \
        == [tokenizer.decode(ids, skip_special_tokens=True) for ids in hf]
