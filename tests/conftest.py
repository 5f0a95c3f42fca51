import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when several processes run.
torch.set_num_threads(int(os.environ.get("E3RL_TEST_THREADS", "2")))

ARCHS = ["llama", "qwen3", "qwen2", "mistral"]


def hf_greedy(path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The reference: Hugging Face ``generate`` greedy, EOS disabled (the engine is compared
    with ``ignore_eos``), one prompt at a time. Returns the new token ids of each prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    model.generation_config.eos_token_id = None
    outs = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
        outs.append(out[0, len(ids):].tolist())
    return outs


def hf_logprobs(model, prompt: list[int], output: list[int]) -> list[float]:
    """The reference log-prob of each output token given everything before it: one forward
    of ``model`` (a transformers model, or a model directory to load) over prompt + output."""
    from transformers import AutoModelForCausalLM

    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
    with torch.no_grad():
        logp = model(torch.tensor([prompt + output])).logits[0].log_softmax(-1)
    return [float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(output)]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """One tiny random model directory per architecture (built once per session)."""
    from e3rl.engine.model_factory import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(root / arch, arch, seed=1) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dirs):
    return tiny_model_dirs["qwen3"]
