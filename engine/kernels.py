"""Native CPU kernels (``engine/csrc``), built on first use with the local C++ compiler.

``torch.utils.cpp_extension`` compiles the sources once per machine and caches the library
under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later processes load
it in well under a second. The instruction set is chosen from this CPU's flags (AVX-512 when
present) and is part of the cache key, so a cache shared between different CPUs stays safe.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("paged_attention.cpp", "sampling.cpp", "norm.cpp")]
_lock = threading.Lock()
_loaded = False
_error: str | None = None


class KernelBuildError(RuntimeError):
    """The native CPU kernels could not be built or loaded on this machine."""


def _isa_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
    if {"avx2", "fma", "f16c"} <= flags:
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def _build_error_line(exc: Exception) -> str:
    """The line of a build failure that says what went wrong (the compiler's first error)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    for marker in ("error:", "not found", "No such file", "required"):
        hit = next((ln for ln in lines if marker in ln), None)
        if hit is not None:
            return hit[:300]
    return lines[-1][:300]


def load_cpu_kernels() -> None:
    """Build (first time on this machine) and load the kernels; registers ``torch.ops.e3rl``.

    Raises ``KernelBuildError`` with the compiler's message when that is impossible."""
    global _loaded, _error
    with _lock:
        if _loaded:
            return
        if _error is not None:
            raise KernelBuildError(_error)
        from torch.utils.cpp_extension import load

        logger.info("loading e3rl's CPU kernels (the first use on a machine compiles them, ~30 s)")
        t0 = time.perf_counter()
        try:
            load(name="e3rl_cpu_kernels", sources=[str(s) for s in _SOURCES],
                 extra_cflags=["-O3", "-fopenmp", *_isa_flags()], is_python_module=False,
                 verbose=False)
        except Exception as exc:  # compiler missing, ninja missing, build error
            _error = f"could not build e3rl's CPU kernels ({_build_error_line(exc)})"
            raise KernelBuildError(_error) from exc
        _loaded = True
        logger.info("e3rl CPU kernels ready (%.1f s)", time.perf_counter() - t0)


def loaded() -> bool:
    """Whether the kernels are built and loaded in this process."""
    return _loaded


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of float32 ``[N, V]`` logits: argmax (first on ties), its log-probability,
    and the entropy of the row's softmax; two passes over the row instead of ~8."""
    return torch.ops.e3rl.greedy_sample(logits)


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float) -> None:
    """``out[s] = attention(query[s], the first context_lens[s] tokens of sequence s)``.

    ``query``/``out``: ``[n, H, D]``; caches: ``[num_blocks, block_size, Hkv, D]``;
    ``block_tables``: int64 ``[n, max_blocks]``; ``context_lens``: int64 ``[n]``."""
    torch.ops.e3rl.paged_decode_attention(out, query, k_cache, v_cache, block_tables,
                                          context_lens, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama-family RMSNorm in one pass (float32 inside, rounded as it does)."""
    return torch.ops.e3rl.rms_norm(x, weight, eps)

