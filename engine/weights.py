"""Checkpoint loading and validation for weight hot-swaps.

A swap is all or nothing: every tensor's name, shape and dtype is checked against the
serving model before the first copy; a bad checkpoint raises ``WeightUpdateError`` and the
model is untouched. Checkpoints are safetensors only (never pickles).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import WeightUpdateError


def resolve_checkpoint_dir(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """``path`` (absolute, or relative to ``root``) resolved with symlinks followed; it must
    stay inside ``root``. Raises ``WeightUpdateError`` for anything that escapes."""
    root_real = Path(root).resolve(strict=True)
    candidate = Path(path)
    if ".." in candidate.parts:
        raise WeightUpdateError(f"checkpoint path {str(path)!r} must not contain '..'")
    if not candidate.is_absolute():
        candidate = root_real / candidate
    real = candidate.resolve()
    if real != root_real and root_real not in real.parents:
        raise WeightUpdateError(f"checkpoint path {str(path)!r} resolves outside the "
                                "checkpoint directory")
    if not real.is_dir():
        raise WeightUpdateError(f"checkpoint path {str(path)!r} is not a directory")
    return real


def read_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files in a directory (CPU)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise WeightUpdateError(f"no .safetensors file in {path} (only safetensors "
                                "checkpoints are accepted)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise WeightUpdateError(f"cannot read {file.name}: {exc}") from exc
        duplicate = tensors.keys() & part.keys()
        if duplicate:
            raise WeightUpdateError(f"tensor {sorted(duplicate)[0]!r} appears in two files")
        tensors.update(part)
    return tensors


def expected_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors a checkpoint must provide (tied copies excluded)."""
    state = model.state_dict()
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys",
                                                                   None) or {}
    if getattr(model.config, "tie_word_embeddings", False) and isinstance(tied, dict):
        for target in tied:
            state.pop(target, None)
    return state


def validate(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``WeightUpdateError`` unless ``tensors`` matches the model exactly."""
    expected = expected_tensors(model)
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    if missing:
        raise WeightUpdateError(f"checkpoint is missing {len(missing)} tensor(s), e.g. "
                                f"{missing[0]!r}")
    if extra:
        raise WeightUpdateError(f"checkpoint has {len(extra)} unexpected tensor(s), e.g. "
                                f"{extra[0]!r}")
    for name, current in expected.items():
        new = tensors[name]
        if tuple(new.shape) != tuple(current.shape):
            raise WeightUpdateError(f"tensor {name!r} has shape {tuple(new.shape)}, the model "
                                    f"has {tuple(current.shape)}")
        if new.dtype != current.dtype:
            raise WeightUpdateError(f"tensor {name!r} has dtype {new.dtype}, the model has "
                                    f"{current.dtype}")
        if new.is_floating_point() and not torch.isfinite(new).all():
            raise WeightUpdateError(f"tensor {name!r} holds NaN or infinite values")


def load_tensors(source: str | os.PathLike | dict | Iterable) -> dict[str, torch.Tensor]:
    """A directory of safetensors, a dict, or an iterable of ``(name, tensor)`` pairs."""
    if isinstance(source, (str, os.PathLike)):
        return read_safetensors_dir(source)
    items = source.items() if isinstance(source, dict) else source
    tensors = {}
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise WeightUpdateError(f"{name!r} is not a tensor")
        tensors[name] = tensor
    return tensors


@torch.no_grad()
def copy_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy validated tensors into the model's parameters and buffers (in place, so tied
    weights stay tied)."""
    state = model.state_dict(keep_vars=True)
    for name, tensor in tensors.items():
        state[name].copy_(tensor)
