"""Checkpoint loading and validation for weight hot-swaps.

A swap is all or nothing: every tensor's name, shape and dtype is checked against the
serving model before the first copy; a bad checkpoint raises ``WeightUpdateError`` and the
model is untouched. Checkpoints are safetensors only (never pickles).

Tied weights (e.g. ``lm_head.weight`` sharing ``model.embed_tokens.weight`` when
``tie_word_embeddings``): a checkpoint may leave the tied copy out (``save_pretrained``) or carry
it (a full ``model.state_dict()``). When carried it must equal its source in the same
checkpoint, and it is never copied: the tie keeps it equal.
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


def tied_weights(model: torch.nn.Module) -> dict[str, str]:
    """Tied tensor name -> the name of the tensor it shares, for the ties that really hold in
    ``model`` (same storage): a declared tie of an untied model is not a tie."""
    declared = getattr(model, "all_tied_weights_keys", None) or getattr(
        model, "_tied_weights_keys", None) or {}
    if not isinstance(declared, dict):  # older transformers: a list of targets, no sources
        return {}
    state = model.state_dict()
    tied = {target: source for target, source in declared.items()
            if target in state and source in state and target != source
            and state[target].data_ptr() == state[source].data_ptr()
            and state[target].shape == state[source].shape}
    for target, source in tied.items():  # a chain a -> b -> c points at its root c
        for _ in range(len(tied)):
            source = tied.get(source, source)
        tied[target] = source
    return tied


def _check_tensor(name: str, new: torch.Tensor, current: torch.Tensor) -> None:
    """Raise ``WeightUpdateError`` unless ``new`` can replace ``current`` (shape, dtype,
    finite values)."""
    if tuple(new.shape) != tuple(current.shape):
        raise WeightUpdateError(f"tensor {name!r} has shape {tuple(new.shape)}, the model "
                                f"has {tuple(current.shape)}")
    if new.dtype != current.dtype:
        raise WeightUpdateError(f"tensor {name!r} has dtype {new.dtype}, the model has "
                                f"{current.dtype}")
    if new.is_floating_point() and not torch.isfinite(new).all():
        raise WeightUpdateError(f"tensor {name!r} holds NaN or infinite values")


def validate(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Raise ``WeightUpdateError`` unless ``tensors`` matches the model exactly. A tied tensor
    may be absent; if present it must equal its source tensor in ``tensors``."""
    state = model.state_dict()
    tied = tied_weights(model)
    expected = {name: t for name, t in state.items() if name not in tied}
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys() - tied.keys())
    if missing:
        raise WeightUpdateError(f"checkpoint is missing {len(missing)} tensor(s), e.g. "
                                f"{missing[0]!r}")
    if extra:
        raise WeightUpdateError(f"checkpoint has {len(extra)} unexpected tensor(s), e.g. "
                                f"{extra[0]!r}")
    for name, current in expected.items():
        _check_tensor(name, tensors[name], current)
    for target, source in tied.items():
        if target not in tensors:
            continue
        new = tensors[target]
        _check_tensor(target, new, state[target])
        # Only the source is copied; a differing tied copy would be silently dropped.
        if not torch.equal(new, tensors[source].to(new.device)):
            raise WeightUpdateError(f"tensor {target!r} is tied to {source!r} but differs "
                                    "from it")


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
    weights stay tied; a tied copy is skipped, ``validate`` checked it equals its source)."""
    state = model.state_dict(keep_vars=True)
    tied = tied_weights(model)
    for name, tensor in tensors.items():
        if name not in tied:
            state[name].copy_(tensor)


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint directory (``read_safetensors_dir``) or a single safetensors file (an
    uploaded checkpoint). Raises ``WeightUpdateError`` for anything unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if Path(path).is_dir():
        return read_safetensors_dir(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightUpdateError(f"not a valid safetensors file: {exc}") from exc


def num_checkpoint_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor of ``model``'s state dict (tied copies included, as a full
    ``state_dict()`` carries them): the largest a valid checkpoint's tensors can be."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
