"""Bad input raises InvalidRequest naming the field; the engine keeps serving."""

import pytest

from e3rl.engine import LLM, InvalidRequest, ModelNotSupported, SamplingParams
from e3rl.engine.model_factory import build_tiny_model


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model, num_kv_blocks=64, block_size=4)


@pytest.mark.parametrize("prompt, params, field", [
    ("", {}, "prompt"),
    ([], {}, "prompt"),
    ([5, 10**6], {}, "prompt"),
    ([5, -1], {}, "prompt"),
    ([1] * 600, {}, "prompt"),
    ([1] * 500, {"max_tokens": 100}, "max_tokens"),
    ("hi", {"max_tokens": 0}, "max_tokens"),
    ("hi", {"temperature": -0.5}, "temperature"),
    ("hi", {"top_p": 0}, "top_p"),
    ("hi", {"nucleus": 0.9}, "nucleus"),
    ("hi", {"n": 0}, "n"),
    ("hi", {"logprobs": 100}, "logprobs"),
    ("hi", {"stop": [""]}, "stop"),
])
def test_bad_input_raises_invalid_request_naming_the_field(llm, prompt, params, field):
    with pytest.raises(InvalidRequest) as info:
        llm.generate([prompt], params)
    assert info.value.param == field
    assert field in str(info.value) or field == "prompt"
    # The engine still serves.
    out = llm.generate("ok", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3
    assert not llm.engine.has_unfinished_requests()


def test_request_larger_than_the_kv_pool_is_refused(tiny_model):
    llm = LLM(tiny_model, num_kv_blocks=4, block_size=4)  # 16 tokens
    with pytest.raises(InvalidRequest) as info:
        llm.generate([[5] * 10], SamplingParams(max_tokens=10))
    assert info.value.param == "max_tokens" and "KV cache" in str(info.value)


def test_more_samples_than_running_sequences_is_refused(tiny_model):
    """n samples run together; more than max_num_seqs could never be scheduled (it waited
    forever: found by the reliability fuzz with best_of 7 against --max-num-seqs 4)."""
    llm = LLM(tiny_model, num_kv_blocks=64, max_num_seqs=4)
    with pytest.raises(InvalidRequest, match=r"n / best_of \(5 samples\) exceeds the "
                       r"engine's max_num_seqs \(4\)") as info:
        llm.generate([5, 6, 7], SamplingParams(n=5, max_tokens=4))
    assert info.value.param == "n"
    out = llm.generate([5, 6, 7], SamplingParams(n=4, max_tokens=4, temperature=1.0))
    assert len(out[0].outputs) == 4 and all(len(o.token_ids) == 4 for o in out[0].outputs)


def test_unknown_engine_option(tiny_model):
    with pytest.raises(InvalidRequest, match="kv_blocks"):
        LLM(tiny_model, kv_blocks=3)


def test_sliding_window_layers_are_refused(tmp_path):
    path = build_tiny_model(tmp_path / "swa", "qwen2", use_sliding_window=True,
                            sliding_window=8, max_window_layers=1)
    with pytest.raises(ModelNotSupported, match="sliding"):
        LLM(path)


def test_uniform_sliding_window_caps_the_context(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["mistral"], num_kv_blocks=64)
    assert llm.engine.max_model_len == 256  # the tiny Mistral's window, not its 512 positions
    with pytest.raises(InvalidRequest):
        llm.generate([[5] * 300], SamplingParams(max_tokens=1))


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="local directories"):
        LLM(tmp_path / "nope")
