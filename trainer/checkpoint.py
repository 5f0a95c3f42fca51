"""Checkpoints: a servable model directory plus the trainer's state, written atomically.

Layout of ``OUTPUT_DIR/checkpoints/step-000050/`` (and of ``OUTPUT_DIR/final/``):

- ``model.safetensors``, ``config.json``, tokenizer files, ``e3rl_healing.json`` (copied
  from the source model): what ``e3rl serve --model`` and ``POST /v1/admin/weights`` load;
- ``e3rl_checkpoint.json``: version, step, parent, algo, config, metrics, data position,
  Python RNG state;
- ``trainer_state/optimizer.safetensors`` and ``trainer_state/rng.safetensors``: AdamW's
  moments and the torch RNG streams (tensors only: nothing here is a pickle). They live in a
  subdirectory so that the weight loaders, which read the top-level ``*.safetensors``, never
  see them.

Everything is written under a temporary name and renamed into place, so a directory named
``step-*`` is always complete; ``latest`` picks the newest one for ``--resume``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

META_FILE = "e3rl_checkpoint.json"
STATE_DIR = "trainer_state"
_COPIED = ("e3rl_healing.json",)
_STEP_RE = re.compile(r"^step-(\d+)$")


@dataclass(slots=True)
class CheckpointState:
    """What a checkpoint restores besides the model weights."""

    step: int
    meta: dict
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def save_checkpoint(path: Path, model: torch.nn.Module, tokenizer, optimizer, *,
                    source_model: str, meta: dict) -> Path:
    """Write a complete checkpoint directory at ``path`` (atomically: tmp dir, then rename;
    an existing directory of that name is replaced)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name in _COPIED:
        if (Path(source_model) / name).is_file():
            shutil.copy2(Path(source_model) / name, tmp / name)
    (tmp / STATE_DIR).mkdir()
    save_file(optimizer_tensors(model, optimizer), str(tmp / STATE_DIR / "optimizer.safetensors"))
    save_file(rng_tensors(), str(tmp / STATE_DIR / "rng.safetensors"))
    full_meta = {**meta, "python_rng": _python_rng_state(), "created": time.time(),
                 "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                  for g in optimizer.param_groups]}
    (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2) + "\n")
    for file in tmp.rglob("*"):  # contents on disk before the rename makes them visible
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(tmp / STATE_DIR)
    _fsync_dir(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    _fsync_dir(path.parent)
    return path


def latest(output_dir: Path) -> Path | None:
    """The newest complete ``step-*`` checkpoint under ``output_dir/checkpoints``, or None."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_RE.match(p.name)) and (p / META_FILE).is_file()]
    return max(found)[1] if found else None


def load_state(path: Path) -> CheckpointState:
    """The trainer state of a checkpoint directory (weights are loaded by the caller)."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
        optimizer = load_file(str(path / STATE_DIR / "optimizer.safetensors"))
        rng = load_file(str(path / STATE_DIR / "rng.safetensors"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} is unreadable: {exc}") from exc
    return CheckpointState(int(meta["step"]), meta, optimizer, rng)


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW's per-parameter state as named tensors (``NAME::exp_avg`` ...)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"{names[id(param)]}::{key}"] = tensor.detach().cpu().contiguous()
    return out


def restore_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> None:
    """Load named tensors from `optimizer_tensors` back into ``optimizer``."""
    params = dict(model.named_parameters())
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups
                                            for p in g["params"])}
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        name, field = key.rsplit("::", 1)
        if name not in params:
            raise ValueError(f"optimizer state names an unknown parameter {name!r}")
        param = params[name]
        value = tensor if field == "step" else tensor.to(param.device)
        state.setdefault(index[id(param)], {})[field] = value
    groups = [{**saved, "params": [index[id(p)] for p in g["params"]]}
              for saved, g in zip(param_groups, optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    if "python_rng" in meta:
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
