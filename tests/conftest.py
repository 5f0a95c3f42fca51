import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when several processes run.
torch.set_num_threads(int(os.environ.get("E3RL_TEST_THREADS", "2")))

ARCHS = ["llama", "qwen3", "qwen2", "mistral"]


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """One tiny random model directory per architecture (built once per session)."""
    from e3rl.engine.model_factory import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(root / arch, arch, seed=1) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dirs):
    return tiny_model_dirs["qwen3"]
