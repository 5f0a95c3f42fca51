"""Weight hot-swap: validated whole, refused whole, never mixes KV of two versions."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from e3rl.engine import LLM, SamplingParams, WeightUpdateError
from e3rl.engine.model_factory import build_tiny_model
from e3rl.engine.weights import resolve_checkpoint_dir
from tests.conftest import hf_greedy, hf_logprobs

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    old = build_tiny_model(root / "old", "llama", seed=1)
    new = build_tiny_model(root / "ckpts" / "new", "llama", seed=2)
    return old, new, root / "ckpts"


def test_swap_then_greedy_equals_hf_with_new_weights(models):
    old, new, _ = models
    llm = LLM(old, num_kv_blocks=64)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert before[0] == hf_greedy(old, PROMPTS[:1], 16)[0]
    llm.update_weights(new, "v2")
    after = llm.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in after] == hf_greedy(new, PROMPTS, 16)
    assert llm.weight_version == "v2" and after[0].weight_version == "v2"
    assert after[0].outputs[0].weight_versions == [(0, "v2")]


def test_swap_mid_generation_recomputes_kv_with_new_weights(models):
    old, new, _ = models
    llm = LLM(old, num_kv_blocks=64)
    engine = llm.engine
    engine.add_request("r", PROMPTS[1], SamplingParams(temperature=0, max_tokens=20,
                                                       ignore_eos=True))
    seq = engine.requests["r"].seqs[0]
    while seq.num_output_tokens < 7:
        engine.step()
    llm.update_weights(new, "v2")
    assert seq.num_computed_tokens == 0 and not seq.block_table  # KV dropped, tokens kept
    while engine.has_unfinished_requests():
        engine.step()
    assert seq.weight_versions == [(0, "0"), (7, "v2")]
    # Every token after the swap is what the new weights predict from the full prefix.
    ids = seq.token_ids
    model = AutoModelForCausalLM.from_pretrained(new, local_files_only=True)
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    p = seq.num_prompt_tokens
    for i in range(7, 20):
        assert ids[p + i] == int(logp[p + i - 1].argmax())
        assert seq.logprobs[i] == pytest.approx(float(logp[p + i - 1, ids[p + i]]), abs=1e-4)
    assert engine.block_manager.num_free_blocks == 64


def _variant(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("case", ["missing", "extra", "shape", "dtype", "truncated", "no_safetensors",
                                  "nan"])
def test_bad_checkpoints_are_refused_whole(models, tmp_path, case):
    old, new, _ = models
    name = "model.layers.0.mlp.up_proj.weight"
    if case == "missing":
        path = _variant(new, tmp_path / case, lambda t: t.pop(name))
    elif case == "extra":
        path = _variant(new, tmp_path / case, lambda t: t.update(extra=torch.zeros(2)))
    elif case == "shape":
        path = _variant(new, tmp_path / case, lambda t: t.update({name: t[name][:-1].clone()}))
    elif case == "dtype":
        path = _variant(new, tmp_path / case, lambda t: t.update({name: t[name].double()}))
    elif case == "nan":
        path = _variant(new, tmp_path / case,
                        lambda t: t.update({name: torch.full_like(t[name], float("nan"))}))
    elif case == "truncated":
        path = shutil.copytree(new, tmp_path / case)
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        path = tmp_path / case
        path.mkdir()
        torch.save({"w": torch.zeros(1)}, path / "pytorch_model.bin")
    llm = LLM(old, num_kv_blocks=64)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    with pytest.raises(WeightUpdateError):
        llm.update_weights(path, "bad")
    assert llm.weight_version == "0"
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == before


def test_checkpoint_paths_must_stay_inside_the_root(models, tmp_path):
    _, new, root = models
    assert resolve_checkpoint_dir("new", root) == (root / "new").resolve()
    assert resolve_checkpoint_dir(root / "new", root) == (root / "new").resolve()
    outside = tmp_path / "outside"
    outside.mkdir()
    for bad in ["../old", str(outside), "missing"]:
        with pytest.raises(WeightUpdateError):
            resolve_checkpoint_dir(bad, root)
    link = root / "escape"
    if not link.exists():
        os.symlink(outside, link)
    with pytest.raises(WeightUpdateError, match="outside"):
        resolve_checkpoint_dir("escape", root)


@pytest.fixture(scope="module")
def tied_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    old = build_tiny_model(root / "old", "llama", seed=1, tie_word_embeddings=True)
    new = build_tiny_model(root / "new", "llama", seed=2, tie_word_embeddings=True)
    return old, new


def _state_dict(path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return {name: t.clone() for name, t in model.state_dict().items()}


def test_full_state_dict_of_a_tied_model_is_accepted(tied_models):
    old, new = tied_models
    state = _state_dict(new)
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    llm = LLM(old, num_kv_blocks=64)
    before = llm.generate(PROMPTS[1], GREEDY)[0].outputs[0]
    llm.update_weights(state, "v2")
    model = llm.engine.runner.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    after = llm.generate(PROMPTS[1], GREEDY)[0].outputs[0]
    # A tied random model tends to repeat its input, so greedy tokens alone cannot tell the
    # two weight sets apart: the log-probabilities do.
    assert after.token_ids == hf_greedy(new, PROMPTS[1:], 16)[0]
    expected = hf_logprobs(new, PROMPTS[1], after.token_ids)
    assert after.logprobs == pytest.approx(expected, abs=1e-4)
    assert after.logprobs != pytest.approx(hf_logprobs(old, PROMPTS[1], after.token_ids),
                                           abs=1e-2)
    # The directory form (``save_pretrained`` leaves the tied copy out) still works.
    llm.engine.update_weights(old, "v3")
    again = llm.generate(PROMPTS[1], GREEDY)[0].outputs[0]
    assert again.token_ids == before.token_ids
    assert again.logprobs == pytest.approx(before.logprobs, abs=1e-5)


@pytest.mark.parametrize("case", ["differs", "shape"])
def test_tied_tensor_differing_from_its_source_is_refused_whole(tied_models, case):
    old, new = tied_models
    state = _state_dict(new)
    if case == "differs":
        state["lm_head.weight"] = state["lm_head.weight"] + 0.01
        match = ("tensor 'lm_head.weight' is tied to 'model.embed_tokens.weight' but differs "
                 "from it")
    else:
        state["lm_head.weight"] = state["lm_head.weight"][:-1].clone()
        match = "tensor 'lm_head.weight' has shape"
    llm = LLM(old, num_kv_blocks=64)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    with pytest.raises(WeightUpdateError, match=match):
        llm.engine.update_weights(state, "bad")
    assert llm.weight_version == "0"
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == before


def test_untied_model_still_requires_its_own_lm_head(models):
    old, new, _ = models
    state = _state_dict(new)
    state.pop("lm_head.weight")
    llm = LLM(old, num_kv_blocks=64)
    with pytest.raises(WeightUpdateError, match="missing 1 tensor"):
        llm.update_weights(state, "bad")


def test_requests_requeued_by_a_swap_do_not_fill_the_waiting_queue(tiny_model):
    """A swap re-queues every running request; they were admitted already, so a new request
    still finds room in a waiting queue of 2 (it was refused with QueueFull)."""
    from e3rl.engine import EngineConfig, SamplingParams
    from e3rl.engine.llm_engine import LLMEngine
    from e3rl.engine.weights import read_checkpoint

    engine = LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32", num_kv_blocks=64,
                                    block_size=4, max_num_seqs=2, max_waiting=2))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], params)
    engine.add_request("b", [8, 9, 10], params)
    engine.step()
    engine.update_weights(read_checkpoint(tiny_model), "1")
    assert engine.stats().num_waiting_requests == 2 and engine.stats().num_queued_requests == 0
    engine.add_request("c", [11, 12], params)  # raised QueueFull before
    assert engine.stats().num_queued_requests == 1
