"""The official ``openai`` client against a live uvicorn server on loopback."""

from __future__ import annotations

import openai
import pytest

from e3rl.engine import SamplingParams

PROMPT = "Once upon a"


@pytest.fixture(scope="module")
def oai(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_completion(oai, llm):
    out = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    [ref] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10))
    assert out.object == "text_completion" and out.model == "tiny"
    assert out.choices[0].text == ref.outputs[0].text
    assert out.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.system_fingerprint == "e3rl-w0"


def test_streaming_completion(oai):
    full = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    stream = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0,
                                    stream=True, stream_options={"include_usage": True},
                                    extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_n_stop_seed_logprobs(oai):
    kwargs = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=11,
                  logprobs=2, extra_body={"ignore_eos": True})
    a = oai.completions.create(**kwargs)
    b = oai.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert a.usage.completion_tokens == 24
    for choice in a.choices:
        assert len(choice.logprobs.tokens) == 8
        assert "".join(choice.logprobs.tokens) == choice.text
    text = a.choices[0].text
    stop = text[3]
    cut = oai.completions.create(**{**kwargs, "n": 1, "logprobs": None}, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_echo_logprobs_for_scoring(oai):
    ids = [30, 31, 32, 33, 34]
    out = oai.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0,
                                 echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == 6 and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])


def test_chat(oai):
    messages = [{"role": "user", "content": "hi"}]
    out = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                      temperature=0, logprobs=True, top_logprobs=1)
    assert out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert len(out.choices[0].logprobs.content) == out.usage.completion_tokens
    stream = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                         temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == msg.content


def test_models_and_errors(oai):
    assert [m.id for m in oai.models.list()] == ["tiny"]
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
