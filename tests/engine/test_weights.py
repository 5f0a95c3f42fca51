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
from tests.conftest import hf_greedy

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
