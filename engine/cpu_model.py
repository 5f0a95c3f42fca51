"""Fast paths on CPU for the transformers model the engine owns.

transformers' modules stay in place (state dicts, weight updates and the attention interface
are unchanged); only some forwards of this one model instance are switched:

- every bf16 ``nn.Linear`` whose output size is a multiple of 16 multiplies with e3rl's
  AVX512_BF16 kernel (``kernels.small_gemm``) from a tiled copy of its weight, where the CPU
  has that instruction set: on a 100M model's 85 projections with the weights in memory (a
  decode step) 2.2x faster than oneDNN's prepacked product at one row, 1.3x at 16, 1.2x at
  32, and on par at prefill sizes; float32 ``nn.Linear`` likewise with the AVX-512 float32
  kernel (1.5x torch's MKL product at one row, 2.8x at 16, 2.0x at 32, 1.5x at 256 rows on
  this project's AMD machine, where MKL does not reach the CPU's peak);
- a SiLU-gated MLP's bf16 gate and up projections share one tiled weight, their tiles
  alternating (``kernels.tile_gate_up``; no more memory than two copies): e3rl's forward
  computes both products and the SiLU-and-multiply in one pass over it
  (``kernels.small_gemm_silu_mul``, bit for bit the two products then ``silu_mul``), and
  each projection's own forward reads its tiles of it;
- other bf16 ``nn.Linear`` multiply with a oneDNN-prepacked copy of their weight: at decode
  sizes oneDNN reads a prepacked weight ~1.4x faster than the plain layout (15.0 -> 10.5 ms
  per forward at one row, 17.8 -> 13.3 ms at 32), same products;
- Llama-family RMSNorms run as one native pass (``kernels.rms_norm``) with transformers'
  arithmetic (~4x faster per call; a rare one-ulp rounding difference), each checked against
  the module's own forward on a random input before it is switched.

The engine applies all of them in bf16, and in float32 only the tiled products
(``optimize``'s ``pack_linears`` / ``fuse_norms`` off; gate/up sharing is bf16 only): their
sums differ from MKL's only in order, a few ulps, and greedy outputs stay token-identical to
transformers' (``benchmarks/throughput.py`` checks it on every run). One oneDNN GEMM shared by
the q/k/v projections (and by gate/up, before the fused SiLU pass) was tried and measured no
faster end to end on CPU, so q/k/v keep their own products. ``refresh`` re-derives the tiled
and packed copies after the weights changed (one derived copy per weight).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import kernels

logger = logging.getLogger(__name__)

# weight * (x * rsqrt(mean(x^2) + eps)).to(dtype) in float32 (Gemma's 1 + weight is not listed)
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


@dataclass(slots=True)
class FastPaths:
    """What ``optimize`` switched, for logs and tests."""

    packed_linears: int = 0  # oneDNN-prepacked copy
    tiled_linears: int = 0  # e3rl's bf16 / float32 product (kernels.small_gemm)
    fused_gate_up: int = 0  # MLPs whose gate and up share one tiled weight (bf16)
    fused_norms: int = 0


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)


def _packed_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]),
                                             module.e3rl_packed_weight, module.bias, "none",
                                             [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def _tiled_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    first, step = module.e3rl_tiles
    if x.dim() == 2:
        return kernels.small_gemm(x, module.e3rl_tiled_weight, module.bias, first, step)
    out = kernels.small_gemm(x.reshape(-1, x.shape[-1]), module.e3rl_tiled_weight, module.bias,
                             first, step)
    return out.view(*x.shape[:-1], out.shape[-1])


def _tile(module: torch.nn.Linear) -> None:
    module.e3rl_tiled_weight = kernels.tile_weight(module.weight.detach())
    module.e3rl_tiles = (0, 1)  # (first tile, step): all of its own


def _gate_up_pair(module: torch.nn.Module) -> tuple[torch.nn.Linear, torch.nn.Linear] | None:
    """A SiLU-gated MLP's bf16 gate and up projections when both are tiled, bias-free and of
    one shape (their tiles can then be interleaved into one weight)."""
    gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
    if not (isinstance(gate, torch.nn.Linear) and isinstance(up, torch.nn.Linear)):
        return None
    ok = all(getattr(m, "e3rl_tiles", None) == (0, 1) and m.bias is None
             and m.weight.dtype == torch.bfloat16 for m in (gate, up))
    return (gate, up) if ok and gate.weight.shape == up.weight.shape else None


def _fuse_gate_up(mlp: torch.nn.Module, gate: torch.nn.Linear, up: torch.nn.Linear) -> None:
    """One tiled weight for both projections, tiles alternating: ``kernels.small_gemm_silu_mul``
    reads it in one pass (e3rl's forward), and each projection reads its own tiles of it
    (transformers' forward). It replaces their two copies: no more memory."""
    fused = kernels.tile_gate_up(gate.weight.detach(), up.weight.detach())
    mlp.e3rl_gate_up = fused
    for i, m in enumerate((gate, up)):
        m.e3rl_tiled_weight, m.e3rl_tiles = fused, (i, 2)


def _tileable(module: torch.nn.Linear) -> bool:
    """Whether e3rl's product applies: kernels built for the weight's dtype (bf16: AVX512_BF16,
    float32: AVX-512), whole tiles of 16 outputs (and pairs of inputs in bf16)."""
    w = module.weight
    if not kernels.loaded() or w.dtype not in (torch.bfloat16, torch.float32):
        return False
    return (kernels.gemm_available(w.dtype) and w.shape[0] % 16 == 0
            and (w.dtype == torch.float32 or w.shape[1] % 2 == 0))


def _fused_rms_norm_forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return kernels.rms_norm(x, module.weight, module.variance_epsilon)


def _matches(module: torch.nn.Module, fast, width: int, generator: torch.Generator) -> bool:
    """``fast(x)`` against the module's own forward on a random input (bf16 tolerance)."""
    x = torch.randn(4, width, generator=generator).to(next(module.parameters()).dtype)
    with torch.no_grad():
        expected, got = module(x), fast(x)
    if torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2):
        return True
    logger.warning("%s differs from e3rl's fused forward; keeping transformers' forward",
                   type(module).__name__)
    return False


def optimize(model: torch.nn.Module, *, pack_linears: bool = True,
             fuse_norms: bool = True) -> FastPaths:
    """Switch this model's forwards to the fast paths. Linears that e3rl's product does not
    take get a oneDNN-packed copy unless ``pack_linears`` is off; fused RMSNorms (unless
    ``fuse_norms`` is off) need the native kernels (``kernels.loaded()``), without them the
    norms stay as they are."""
    done = FastPaths()
    generator = torch.Generator(device="cpu").manual_seed(0)  # leave the global RNG alone
    for module in model.modules():
        if "forward" in module.__dict__:
            continue  # already switched
        if isinstance(module, torch.nn.Linear) and _tileable(module):
            _tile(module)
            module.forward = _tiled_linear_forward.__get__(module)
            done.tiled_linears += 1
        elif isinstance(module, torch.nn.Linear) and pack_linears:
            module.e3rl_packed_weight = _pack(module.weight)
            module.forward = _packed_linear_forward.__get__(module)
            done.packed_linears += 1
        elif fuse_norms and kernels.loaded() and type(module).__name__ in RMS_NORM_CLASSES:
            fast = _fused_rms_norm_forward.__get__(module)
            if _matches(module, fast, module.weight.shape[0], generator):
                module.forward = fast
                done.fused_norms += 1
    for module in model.modules():
        pair = _gate_up_pair(module)
        if pair is not None:
            _fuse_gate_up(module, *pair)
            done.fused_gate_up += 1
    return done


def refresh(model: torch.nn.Module) -> None:
    """Re-derive every tiled and packed copy from the current parameters (after a weight
    update)."""
    for module in model.modules():
        if hasattr(module, "e3rl_gate_up"):
            _fuse_gate_up(module, module.gate_proj, module.up_proj)
        elif getattr(module, "e3rl_tiles", None) == (0, 1):
            _tile(module)
        elif hasattr(module, "e3rl_packed_weight"):
            module.e3rl_packed_weight = _pack(module.weight)
