"""/v1/completions over HTTP against the ASGI app: shapes, usage, n, stop, logprobs, echo,
seed, best_of, batches of prompts, streaming."""

from __future__ import annotations

import json
import math

import pytest

from e3rl.engine import SamplingParams
from e3rl.server.protocol import CompletionResponse

PROMPT = "The cat sat on"


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(response) -> list:
    """The JSON payloads of an SSE body; asserts it ends with [DONE]."""
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_shape_and_usage(client, engine):
    body = complete(client, prompt=PROMPT, max_tokens=7, temperature=0, ignore_eos=True)
    assert set(body) == {"id", "object", "created", "model", "system_fingerprint", "choices",
                         "usage"}
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == "length"
    num_prompt = len(engine.tokenizer(PROMPT)["input_ids"])
    completion_ids = engine.tokenizer(choice["text"])["input_ids"]  # char-level: exact
    assert body["usage"] == {"prompt_tokens": num_prompt, "completion_tokens": 7,
                             "total_tokens": num_prompt + 7}
    assert len(completion_ids) == 7


def test_greedy_equals_offline_engine(client, llm):
    body = complete(client, prompt=PROMPT, max_tokens=12, temperature=0)
    [ref] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12))
    assert body["choices"][0]["text"] == ref.outputs[0].text
    assert body["choices"][0]["finish_reason"] == ref.outputs[0].finish_reason


def test_n_and_batched_prompts_index_choices(client):
    body = complete(client, prompt=["ab", "cd", "efg"], n=2, max_tokens=3, temperature=0.9,
                    seed=3, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert body["usage"]["completion_tokens"] == 18
    assert body["usage"]["prompt_tokens"] == 2 + 2 + 3
    ids = complete(client, prompt=[[5, 6], [7, 8, 9]], max_tokens=2, temperature=0)
    assert [c["index"] for c in ids["choices"]] == [0, 1]
    assert ids["usage"]["prompt_tokens"] == 5


def test_stop_string_cuts_text(client):
    free = complete(client, prompt=PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
    text = free["choices"][0]["text"]
    stop = text[4:6]
    cut = complete(client, prompt=PROMPT, max_tokens=12, temperature=0, ignore_eos=True,
                   stop=[stop])
    assert cut["choices"][0]["text"] == text[:text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    kept = complete(client, prompt=PROMPT, max_tokens=12, temperature=0, ignore_eos=True,
                    stop=stop, include_stop_str_in_output=True)
    assert kept["choices"][0]["text"] == text[:text.index(stop) + len(stop)]


def test_logprobs(client, llm):
    body = complete(client, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                    ignore_eos=True)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    assert lp["text_offset"] == [0, 1, 2, 3, 4]
    [ref] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=5, logprobs=3,
                                                  ignore_eos=True))
    assert lp["token_logprobs"] == pytest.approx(ref.outputs[0].logprobs, abs=1e-5)
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 3 <= len(top) <= 4 and top[token] == pytest.approx(logprob)
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the best token


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_the_prompt(client, llm, max_tokens):
    ids = [20, 33, 41, 52, 60, 71]
    body = complete(client, prompt=ids, max_tokens=max_tokens, temperature=0, logprobs=1,
                    echo=True)
    [choice] = body["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    [ref] = llm.generate([ids], SamplingParams(temperature=0, max_tokens=max(1, max_tokens),
                                               prompt_logprobs=1))
    assert lp["token_logprobs"][1:len(ids)] == pytest.approx(ref.prompt_token_logprobs[1:],
                                                             abs=1e-5)
    prompt_text = llm.tokenizer.decode(ids)
    assert choice["text"].startswith(prompt_text)
    assert choice["text"] == prompt_text + (ref.outputs[0].text if max_tokens else "")
    assert body["usage"]["completion_tokens"] == max_tokens


def test_echo_text_prompt_without_logprobs(client):
    body = complete(client, prompt="xyz", max_tokens=2, temperature=0, echo=True,
                    ignore_eos=True)
    assert body["choices"][0]["text"].startswith("xyz")
    assert len(body["choices"][0]["text"]) == 5


def test_seed_reproducible(client):
    a = complete(client, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7, n=2,
                 ignore_eos=True)
    b = complete(client, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=7, n=2,
                 ignore_eos=True)
    c = complete(client, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=8, n=2,
                 ignore_eos=True)
    texts = lambda body: [ch["text"] for ch in body["choices"]]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert texts(a)[0] != texts(a)[1]  # each sample has its own stream


def test_best_of_returns_the_likeliest(client):
    body = complete(client, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=1, n=1,
                    best_of=4, ignore_eos=True)
    assert len(body["choices"]) == 1 and body["choices"][0]["index"] == 0
    assert body["usage"]["completion_tokens"] == 24  # all four were generated
    every = complete(client, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=1, n=4,
                     logprobs=0, ignore_eos=True)
    totals = {c["text"]: sum(c["logprobs"]["token_logprobs"]) for c in every["choices"]}
    assert body["choices"][0]["text"] == max(totals, key=totals.get)


def test_max_tokens_null_fills_the_context(client, engine):
    body = complete(client, prompt="a" * 500, max_tokens=None, temperature=0, ignore_eos=True)
    assert body["usage"]["total_tokens"] == engine.max_model_len
    assert body["choices"][0]["finish_reason"] == "length"


# Make common characters segment boundaries and erase every segment (threshold below any
# score), so a random tiny model erases often.
FORCE_HEALING = {"threshold": -1.0, "segment_boundary": ["a", "e", "i", "o", " "],
                 "max_segment_tokens": 8, "max_erasures": 20, "max_retries_per_segment": 2,
                 "max_erased_fraction": 1.0}


def test_healing_off_keeps_openai_shape_and_bad_options_are_refused(client):
    body = complete(client, prompt=PROMPT, max_tokens=2, healing={"enabled": False})
    assert "e3rl" not in body["choices"][0] and "computed_tokens" not in body["usage"]
    r = client.post("/v1/completions", json={"prompt": PROMPT, "healing": {"kappa": -1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "healing.kappa"
    r = client.post("/v1/completions", json={"prompt": PROMPT, "healing": {"bogus": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "healing.bogus"


def test_healing_response_carries_erasures_and_computed_tokens(client, llm):
    body = complete(client, prompt=PROMPT, max_tokens=30, temperature=1.0, seed=4,
                    ignore_eos=True, healing=FORCE_HEALING)
    [choice] = body["choices"]
    ext = choice["e3rl"]
    assert ext["num_erasures"] == len(ext["erasures"]) > 0
    assert ext["num_output_tokens"] == body["usage"]["completion_tokens"] == 30
    assert body["usage"]["computed_tokens"] == ext["num_computed_tokens"] > 30
    event = ext["erasures"][0]
    assert {"position", "erased_token_ids", "erased_nll", "score", "threshold", "attempt",
            "replacement_token_ids"} <= set(event)
    [ref] = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=4, max_tokens=30,
                                                  ignore_eos=True, healing=FORCE_HEALING))
    assert choice["text"] == ref.outputs[0].text


def test_healing_stream_never_shows_erased_text(client):
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 1.0, "seed": 9,
            "ignore_eos": True, "healing": FORCE_HEALING}
    final = complete(client, **body)
    r = client.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200
    events = sse_events(r)
    pieces = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert final["choices"][0]["e3rl"]["num_erasures"] > 0
    # Released text is only ever appended to: the stream is the final text, piece by piece,
    # so no erased text was ever sent.
    assert "".join(pieces) == final["choices"][0]["text"]
    last = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]][-1]
    assert last["choices"][0]["e3rl"]["num_erasures"] == final["choices"][0]["e3rl"]["num_erasures"]


@pytest.mark.parametrize("field,value", [("presence_penalty", 0.5), ("frequency_penalty", -1.0),
                                         ("logit_bias", {"5": 10}), ("suffix", "x")])
def test_unsupported_options_are_refused_by_name(client, field, value):
    r = client.post("/v1/completions", json={"prompt": PROMPT, field: value})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]


def test_zero_penalties_are_accepted(client):
    complete(client, prompt=PROMPT, max_tokens=2, presence_penalty=0, frequency_penalty=0.0,
             logit_bias={}, user="someone")


def test_stream_matches_non_stream(client):
    params = dict(prompt=[PROMPT, "xy"], max_tokens=8, temperature=0, ignore_eos=True, n=2,
                  logprobs=1)
    full = complete(client, **params)
    r = client.post("/v1/completions", json={**params, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    for event in events:  # the hand-built chunks have the documented shape
        assert CompletionResponse.model_validate(event).model_dump() == event
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for event in events[:-1]:
        assert event["object"] == "text_completion" and event["usage"] is None
        [choice] = event["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in full["choices"]}
    assert finish == {c["index"]: "length" for c in full["choices"]}
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]


def test_stream_without_usage_has_no_usage_field(client):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3,
                                             "stream": True})
    events = sse_events(r)
    assert events and all("usage" not in e for e in events)


def test_stream_echo_prefixes_the_prompt(client):
    r = client.post("/v1/completions", json={"prompt": "hey", "max_tokens": 3, "echo": True,
                                             "stream": True, "temperature": 0})
    events = sse_events(r)
    assert events[0]["choices"][0]["text"].startswith("hey")


def test_logprobs_are_finite_and_negative(client):
    body = complete(client, prompt=PROMPT, max_tokens=4, temperature=0.7, seed=0, logprobs=2)
    for value in body["choices"][0]["logprobs"]["token_logprobs"]:
        assert math.isfinite(value) and value <= 0
