"""e3rl's own forward of Llama-family causal LMs on CPU (``EngineConfig.model_impl``).

transformers' module forwards spend most of a small model's decode step outside the matrix
products: ~40 tensor ops per decoder layer (views, transposes, the rotary embedding's slices
and concatenations, separate casts of each RMSNorm, the residual adds), each dispatched from
Python with its module's call machinery, plus the causal-mask set-up of every forward. This
forward runs the same arithmetic over the packed ``[T, hidden]`` rows of a step with ~12 ops
per layer: ``cpu_model``'s projections (tiled or prepacked weights), and native passes
(``kernels``) for residual add + RMSNorm, Qwen3's per-head q/k norms + rotary embedding, and
SiLU-and-multiply (in bf16 inside the gate/up product's pass over its shared weight,
``kernels.small_gemm_silu_mul``), each with transformers' roundings. Attention is the engine's paged
attention (``attention.attend``).

It reads the weights of the transformers model it was built from at every call (parameters,
and the tiled or packed copies that ``cpu_model.refresh`` re-derives), so weight updates need
nothing more. ``build`` accepts only the families whose forward this is, module by module; the
engine checks its logits against transformers' forward once at load (``ModelRunner``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import attention, kernels
from .attention import AttentionMetadata
from .cpu_model import RMS_NORM_CLASSES

# Causal LMs whose decoder is exactly: RMSNorm -> q/k/v projections [-> per-head q/k RMSNorm]
# -> rotary embedding -> attention -> o projection -> residual; RMSNorm -> SiLU-gated MLP ->
# residual; final RMSNorm; lm_head. (Gemma scales embeddings and offsets its norms, Phi-3
# fuses qkv, Cohere uses LayerNorm: not listed.)
SUPPORTED = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                       "Qwen3ForCausalLM"})


class NotSupported(Exception):
    """This model cannot run on the native forward (the message says why)."""


class Mismatch(NotSupported):
    """The native forward ran but disagreed with transformers' (or failed) on this model."""


@dataclass(slots=True)
class _Layer:
    attn: torch.nn.Module
    mlp: torch.nn.Module
    input_norm: torch.nn.Module
    post_norm: torch.nn.Module
    q_norm: torch.nn.Module | None
    k_norm: torch.nn.Module | None


def _fast(module) -> bool:
    """An nn.Linear whose forward ``cpu_model`` switched (tiled or prepacked weight)."""
    return hasattr(module, "e3rl_tiled_weight") or hasattr(module, "e3rl_packed_weight")


def _linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return module.forward(x)  # cpu_model's forward, without nn.Module's call machinery


def _norm_class(module, where: str) -> None:
    if type(module).__name__ not in RMS_NORM_CLASSES:
        raise NotSupported(f"{where} is {type(module).__name__}, not a Llama-family RMSNorm")


class NativeForward:
    """``forward(ids, positions, keep, meta)`` -> logits ``[len(keep), vocab]`` of the packed
    step (``ids``/``positions``: ``[T]`` long; ``keep``: the rows whose logits are needed)."""

    def __init__(self, model: torch.nn.Module):
        name = type(model).__name__
        if name not in SUPPORTED:
            raise NotSupported(f"{name} is not one of {sorted(SUPPORTED)}")
        if not kernels.loaded():
            raise NotSupported("e3rl's CPU kernels are not loaded")
        config = model.config
        if getattr(config, "hidden_act", None) not in ("silu", "swish"):
            raise NotSupported(f"activation {getattr(config, 'hidden_act', None)!r} is not SiLU")
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        _norm_class(self.norm, "the final norm")
        self.layers: list[_Layer] = []
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            if not all(_fast(m) for m in linears):
                raise NotSupported(f"layer {i}: projections are not cpu_model's nn.Linear "
                                   "(q/k/v/o, gate/up/down)")
            _norm_class(layer.input_layernorm, f"layer {i}'s input norm")
            _norm_class(layer.post_attention_layernorm, f"layer {i}'s post-attention norm")
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            if (q_norm is None) != (k_norm is None):
                raise NotSupported(f"layer {i}: a q norm without a k norm")
            if q_norm is not None:
                _norm_class(q_norm, f"layer {i}'s q norm")
                _norm_class(k_norm, f"layer {i}'s k norm")
            self.layers.append(_Layer(attn, mlp, layer.input_layernorm,
                                      layer.post_attention_layernorm, q_norm, k_norm))
        if not _fast(model.lm_head):
            raise NotSupported("lm_head is not cpu_model's nn.Linear")
        attn = self.layers[0].attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = ids.shape[0]
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        residual = F.embedding(ids, self.embed.weight)  # [T, hidden], updated in place below
        cos, sin = self.rotary(residual, positions.view(1, -1))  # [1, T, D] each
        cos, sin = cos[0], sin[0]
        mlp_out = None
        # The last layer's attention output, o projection and MLP only for the rows whose
        # logits are needed (prompt rows of a prefill need their K/V, nothing after it).
        last = len(self.layers) - 1
        last_meta = (attention.rows_only(meta, keep) if 0 < keep.numel() < num_tokens
                     else None)
        for i, layer in enumerate(self.layers):
            norm = layer.input_norm
            if mlp_out is None:
                h = kernels.rms_norm(residual, norm.weight, norm.variance_epsilon)
            else:
                h = kernels.add_rms_norm_(residual, mlp_out, norm.weight, norm.variance_epsilon)
            attn = layer.attn
            q = _linear(attn.q_proj, h).view(num_tokens, hq, d)
            k = _linear(attn.k_proj, h).view(num_tokens, hk, d)
            v = _linear(attn.v_proj, h).view(num_tokens, hk, d)
            qn, kn = layer.q_norm, layer.k_norm
            if qn is None:
                kernels.qk_norm_rope_(q, k, None, None, cos, sin, 0.0)
            else:
                kernels.qk_norm_rope_(q, k, qn.weight, kn.weight, cos, sin, qn.variance_epsilon)
            if i == last and last_meta is not None:
                o = attention.attend(last_meta, i, q.index_select(0, keep), k, v, self.scaling)
                residual = residual.index_select(0, keep)
                num_tokens, keep = keep.numel(), None
            else:
                o = attention.attend(meta, i, q, k, v, self.scaling)
            a = _linear(attn.o_proj, o.view(num_tokens, hq * d))
            norm = layer.post_norm
            h = kernels.add_rms_norm_(residual, a, norm.weight, norm.variance_epsilon)
            mlp = layer.mlp
            gate_up = mlp.__dict__.get("e3rl_gate_up")  # cpu_model's (re-derived on updates)
            if gate_up is not None:  # both products and the SiLU-and-multiply in one pass
                gated = kernels.small_gemm_silu_mul(h, gate_up)
            else:
                gated = kernels.silu_mul(_linear(mlp.gate_proj, h), _linear(mlp.up_proj, h))
            mlp_out = _linear(mlp.down_proj, gated)
        h = kernels.add_rms_norm_(residual, mlp_out, self.norm.weight,
                                  self.norm.variance_epsilon)
        return _linear(self.model.lm_head, h if keep is None else h.index_select(0, keep))
