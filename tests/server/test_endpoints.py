"""Chat completions, the tokenizer endpoints, /v1/models, /health and /ready over HTTP
against the ASGI app."""

from __future__ import annotations

import json
import threading

import pytest

from e3rl.engine import SamplingParams
from e3rl.server.protocol import ChatCompletionChunk

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def chat(client, **body):
    r = client.post("/v1/chat/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_uses_the_template_and_matches_the_engine(client, engine, llm):
    body = chat(client, messages=MESSAGES, max_tokens=9, temperature=0)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    rendered = engine.tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                                    add_generation_prompt=True)
    ids = engine.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    [ref] = llm.generate([ids], SamplingParams(temperature=0, max_tokens=9))
    assert choice["message"]["content"] == ref.outputs[0].text
    assert choice["finish_reason"] == ref.outputs[0].finish_reason
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == len(ref.outputs[0].token_ids)


def test_chat_logprobs(client):
    body = chat(client, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                top_logprobs=2, ignore_eos=True)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
        assert bytes(entry["bytes"]).decode() == entry["token"]
    plain = chat(client, messages=MESSAGES, max_tokens=2, logprobs=True, ignore_eos=True)
    assert all(e["top_logprobs"] == [] for e in plain["choices"][0]["logprobs"]["content"])


def test_chat_stream(client):
    full = chat(client, messages=MESSAGES, max_tokens=6, temperature=0, n=2, ignore_eos=True)
    r = client.post("/v1/chat/completions", json={
        "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "n": 2, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}})
    lines = [line for line in r.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    for event in events:  # the hand-built chunks have the documented shape
        ChatCompletionChunk.model_validate(event)
    texts = {0: "", 1: ""}
    roles = set()
    for event in events[:-1]:
        assert event["object"] == "chat.completion.chunk"
        [choice] = event["choices"]
        if choice["delta"].get("role"):
            roles.add(choice["index"])
        texts[choice["index"]] += choice["delta"].get("content") or ""
    assert roles == {0, 1}
    assert texts == {c["index"]: c["message"]["content"] for c in full["choices"]}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]


def test_chat_without_template_is_400(client, engine, monkeypatch):
    for tokenizer in (engine.tokenizer, engine._prompt_tokenizer):  # as a model without one
        monkeypatch.setattr(tokenizer, "chat_template", None)
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 400
    assert "chat template" in r.json()["error"]["message"]


def test_chat_rejects_content_it_cannot_serve(client):
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "tools": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    r = client.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_tokenize_detokenize_roundtrip(client, engine):
    r = client.post("/tokenize", json={"prompt": "hello</s>", "add_special_tokens": False})
    body = r.json()
    assert body["tokens"] == engine.tokenizer("hello</s>", add_special_tokens=False)["input_ids"]
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    r = client.post("/detokenize", json={"tokens": body["tokens"]})
    assert r.json() == {"prompt": "hello</s>"}
    r = client.post("/detokenize", json={"tokens": [10 ** 6]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = client.post("/tokenize", json={"messages": MESSAGES})
    assert r.json()["count"] > 10


def test_tokenizer_info_is_what_lm_eval_needs(client):
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>"
    assert "{% for message in messages %}" in info["chat_template"]


def test_models(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny"]
    assert body["data"][0]["max_model_len"] == 512
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready"}


def test_prompts_are_tokenized_once_off_the_event_loop(client, engine, monkeypatch):
    """A long text prompt takes seconds to tokenize: that happens on the tokenizer thread,
    once per prompt, never on the event loop that serves every other stream."""
    calls = []
    encode = type(engine._prompt_tokenizer).__call__

    def spy(self, *args, **kwargs):
        calls.append(threading.current_thread().name)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(type(engine._prompt_tokenizer), "__call__", spy)
    r = client.post("/v1/completions", json={"prompt": ["Hello there", "and more"],
                                             "max_tokens": 2})
    assert r.status_code == 200
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200
    assert len(calls) == 3 and all(name.startswith("e3rl-tokenizer") for name in calls)
