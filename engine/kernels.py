"""Native CPU kernels (``engine/csrc``), built on first use with the local C++ compiler.

``torch.utils.cpp_extension`` compiles the sources once per machine and caches the library
under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``); later processes load
it in well under a second. The instruction set is chosen from this CPU's flags (AVX-512 when
present). The library's name carries a hash of the sources, the flags (instruction set
included), torch's version and Python's ABI, so a cache shared between different CPUs or
versions stays safe, and a library already in the cache is loaded directly: no compiler, no
write (a container image builds every instruction set ahead of time, ``python -m
e3rl.engine.build_kernels --isa all``, into a read-only directory).
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name
            for name in ("paged_attention.cpp", "sampling.cpp", "fused.cpp", "gemm.cpp")]
_lock = threading.Lock()
_loaded = False
_error: str | None = None


class KernelBuildError(RuntimeError):
    """The native CPU kernels could not be built or loaded on this machine."""


# Instruction sets the kernels are built for: compiler flags, and the CPU flags they need.
ISA_FLAGS = {
    "avx512bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16",
                   "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
}
_ISA_NEEDS = {"avx512bf16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16",
                              "fma"},
              "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
              "avx2": {"avx2", "fma", "f16c"}, "generic": set()}


def cpu_isa() -> str:
    """The best entry of ``ISA_FLAGS`` this CPU runs."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "generic"
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    return next(isa for isa, needs in _ISA_NEEDS.items() if needs <= flags)


def _cflags(isa: str) -> list[str]:
    return ["-O3", "-fopenmp", *ISA_FLAGS[isa]]


def library_name(isa: str) -> str:
    """``e3rl_cpu_kernels_<hash>``: the hash covers what the library depends on (sources,
    flags, torch's version, Python's ABI), so a cached one is only loaded by its match."""
    digest = hashlib.sha256()
    for source in _SOURCES:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    for part in (*_cflags(isa), torch.__version__, sys.implementation.cache_tag,
                 getattr(sys, "abiflags", "")):
        digest.update(part.encode() + b"\0")
    return f"e3rl_cpu_kernels_{digest.hexdigest()[:12]}"


def _cached_library(name: str) -> Path | None:
    """The built library of ``name`` in torch's extension cache, if it is there."""
    from torch.utils.cpp_extension import _get_build_directory

    try:
        path = Path(_get_build_directory(name, verbose=False)) / f"{name}.so"
    except OSError:  # the directory is missing and cannot be made (a read-only cache)
        return None
    return path if path.is_file() else None


def _build(isa: str) -> None:
    """Compile (unless ninja finds it up to date) and load the kernels for ``isa``."""
    from torch.utils.cpp_extension import load

    load(name=library_name(isa), sources=[str(s) for s in _SOURCES], extra_cflags=_cflags(isa),
         is_python_module=False, verbose=False)


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
        isa = cpu_isa()
        t0 = time.perf_counter()
        cached = _cached_library(library_name(isa))
        if cached is not None:
            try:
                torch.ops.load_library(str(cached))
                _loaded = True
                logger.info("e3rl CPU kernels (%s) loaded from %s", isa, cached)
                return
            except OSError as exc:  # half written by a concurrent build: build it here
                logger.info("cannot load %s (%s); building the kernels", cached, exc)
        logger.info("loading e3rl's CPU kernels (the first use on a machine compiles them, ~30 s)")
        try:
            _build(isa)
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
                           context_lens: torch.Tensor, scale: float,
                           row_tables: torch.Tensor | None = None) -> None:
    """``out[s] = attention(query[s], the first context_lens[s] tokens of row s's sequence)``.

    ``query``/``out``: ``[n, H, D]``; caches: ``[num_blocks, block_size, Hkv, D]``;
    ``block_tables``: int64 ``[S, max_blocks]``; ``context_lens``: int64 ``[n]``. Row s reads
    through ``block_tables[row_tables[s]]`` (int64 ``[n]``), or ``block_tables[s]`` without
    ``row_tables`` (then ``S == n``: one decode token per sequence). The rows of a prefill
    chunk share their sequence's table, each with context ``position + 1`` (causal)."""
    torch.ops.e3rl.paged_decode_attention(out, query, k_cache, v_cache, block_tables,
                                          context_lens, scale, row_tables)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama-family RMSNorm in one pass (float32 inside, rounded as it does)."""
    return torch.ops.e3rl.rms_norm(x, weight, eps)


def add_rms_norm_(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """``residual += x`` (rounded to its dtype, in place), then ``rms_norm(residual)``: a
    decoder layer's residual add and the next norm in one pass."""
    return torch.ops.e3rl.add_rms_norm_(residual, x, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with transformers' roundings (the gated MLP's middle)."""
    return torch.ops.e3rl.silu_mul(gate, up)


def qk_norm_rope_(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None,
                  k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                  eps: float) -> None:
    """In place on ``q`` ``[T, H, D]`` and ``k`` ``[T, Hkv, D]``: per-head RMSNorm (when the
    weights are given, Qwen3's q_norm/k_norm), then the rotary embedding with ``cos``/``sin``
    ``[T, D]`` (transformers' ``apply_rotary_pos_emb``)."""
    torch.ops.e3rl.qk_norm_rope_(q, k, q_weight, k_weight, cos, sin, eps)


def gemm_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether this build has the few-rows product (``small_gemm``) for ``dtype``: bf16 needs
    AVX512_BF16, float32 AVX-512."""
    return bool(torch.ops.e3rl.gemm_available(dtype))


def tile_weight(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 or float32 ``[out, in]`` weight in ``small_gemm``'s layout (``out`` a multiple
    of 16)."""
    return torch.ops.e3rl.tile_weight(weight)


def small_gemm(x: torch.Tensor, tiled: torch.Tensor, bias: torch.Tensor | None,
               first_tile: int = 0, tile_step: int = 1) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` ``[rows, in]`` (bf16 or float32, as ``W``) from
    ``tile_weight(W)``: each group of weight tiles comes from memory once and from cache for
    the rows after the first 6. Each row's sums run over the inputs in order, whatever the
    number of rows (a row's result does not depend on the others). ``first_tile`` /
    ``tile_step`` (bf16) select every ``tile_step``-th tile of 16 outputs: one projection of a
    ``tile_gate_up`` pair (gate 0 / 2, up 1 / 2)."""
    return torch.ops.e3rl.small_gemm(x, tiled, bias, first_tile, tile_step)


def tile_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """bf16 gate and up weights ``[out, in]`` tiled together, tiles alternating (gate 0, up 0,
    gate 1, ...): ``small_gemm_silu_mul`` reads both in one pass, and ``small_gemm`` with
    ``first_tile`` 0 / 1 and ``tile_step`` 2 each alone (no second copy)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} "
                         f"{up.dtype} differ")
    out, inputs = gate.shape
    if out % 16:
        raise ValueError(f"out ({out}) must be a multiple of 16")
    pairs = torch.stack([gate.reshape(out // 16, 16, inputs), up.reshape(out // 16, 16, inputs)],
                        dim=1)
    return tile_weight(pairs.reshape(2 * out, inputs))


def small_gemm_silu_mul(x: torch.Tensor, tiled_gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_mul(x @ G.T, x @ U.T)`` (bf16, transformers' roundings: equal to the two
    products then ``silu_mul``) in one pass over ``tile_gate_up(G, U)``."""
    return torch.ops.e3rl.small_gemm_silu_mul(x, tiled_gate_up)


def prebuild(isas: list[str]) -> list[Path]:
    """Compile the kernels for each of ``isas`` into the extension cache without loading
    them (a library for another CPU may not even load here), for an image that must start
    without a compiler on whichever CPU it lands. Returns the libraries' paths."""
    from unittest import mock

    paths = []
    for isa in isas:
        with mock.patch.object(torch.ops, "load_library", lambda path: None):
            _build(isa)
        path = _cached_library(library_name(isa))
        if path is None:
            raise KernelBuildError(f"the {isa} build left no library behind")
        logger.info("built e3rl CPU kernels (%s): %s", isa, path)
        paths.append(path)
    return paths
