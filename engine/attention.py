"""Paged attention, plugged into transformers through its attention interface.

Every layer of a transformers model calls ``paged_attention(module, query, key, value, ...)``
with the packed batch of this step (``[1, H, T, D]``, ragged: no padding between
sequences). It writes the new K/V into the pool at ``slot_mapping`` and attends each
sequence's queries over that sequence's blocks. Tokens are packed decode-first, by context
length. Decode tokens (one per sequence) go either to the native CPU kernel (one call for all
of them, K/V read in place from the pool) or, with the SDPA backend, to a few groups of similar
length, one SDPA call per group over gathered blocks; the rest are prefill chunks, one SDPA
call each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import kernels
from .kv_cache import KVCache

ATTN_IMPLEMENTATION = "e3rl_paged"
METADATA_KWARG = "e3rl_attn_metadata"


@dataclass(slots=True)
class PrefillChunk:
    """Query tokens ``[start, end)`` of the packed batch, one sequence, with
    ``num_cached`` tokens of that sequence already in the pool."""

    start: int
    end: int
    num_cached: int
    block_table: torch.Tensor | None = None  # [num_blocks_of_seq], when num_cached > 0
    mask: torch.Tensor | None = None  # [t, num_cached + t] bool, when num_cached > 0


@dataclass(slots=True)
class DecodeGroup:
    """Decode tokens ``[start, end)`` of the packed batch, one per sequence, sequences of
    similar context length (grouped so that gathering their blocks wastes little padding)."""

    start: int
    end: int
    block_tables: torch.Tensor  # [n, max_blocks] long
    mask: torch.Tensor | None = None  # [n, 1, 1, max_blocks * block_size] bool
    context_len: int | None = None  # all contexts this long: slice instead of a mask


@dataclass(slots=True)
class NativeDecode:
    """Tokens ``[start, end)`` of the packed batch attended by the native kernel straight from
    the pool (no gather, no padding to the longest context): decode tokens, one per sequence,
    and, with ``row_tables``, prefill tokens too (each row with its own causal context)."""

    start: int
    end: int
    block_tables: torch.Tensor  # [n, max_blocks] long
    context_lens: torch.Tensor  # [n] long, including this step's token
    row_tables: torch.Tensor | None = None  # [n] long: row of block_tables each token reads


@dataclass(slots=True)
class AttentionMetadata:
    """What attention needs besides q/k/v, built once per step and shared by all layers."""

    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [T] long: pool slot of each packed token
    decodes: list[DecodeGroup] = field(default_factory=list)
    native_decode: NativeDecode | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    num_calls: int = 0  # layers that ran through paged attention (load-time check)


def rows_only(meta: AttentionMetadata, rows: torch.Tensor) -> AttentionMetadata | None:
    """Metadata that writes every packed token's K/V but attends only the tokens ``rows``
    (``attend``'s ``q`` then holds just those rows, in that order): the last layer of a step,
    whose other rows' outputs nothing reads. None unless the whole step runs through the
    native kernel (the SDPA paths attend whole chunks)."""
    d = meta.native_decode
    if (d is None or meta.decodes or meta.prefills or d.start != 0
            or d.end != meta.slot_mapping.numel()):
        return None
    tables = d.row_tables.index_select(0, rows) if d.row_tables is not None else rows
    return AttentionMetadata(
        kv_cache=meta.kv_cache, slot_mapping=meta.slot_mapping,
        native_decode=NativeDecode(0, rows.numel(), d.block_tables,
                                   d.context_lens.index_select(0, rows), tables))


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, Hkv, D] gathered by ``[N, MB]`` block ids -> [N, Hkv, MB * bs, D]."""
    n, mb = block_tables.shape
    blocks = cache.index_select(0, block_tables.view(-1))  # [N * MB, bs, Hkv, D]
    return blocks.view(n, mb * cache.shape[1], cache.shape[2], cache.shape[3]).transpose(1, 2)


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers' attention interface: ``query`` ``[1, H, T, D]``, ``key``/``value``
    ``[1, Hkv, T, D]``; returns ``([1, T, H, D], None)``."""
    meta: AttentionMetadata | None = kwargs.get(METADATA_KWARG)
    if meta is None:
        raise RuntimeError("paged attention called without e3rl attention metadata; "
                           "this model instance is owned by the e3rl engine")
    out = attend(meta, module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1),
                 value[0].transpose(0, 1), scaling)
    return out.unsqueeze(0), None


def attend(meta: AttentionMetadata, layer_idx: int, q: torch.Tensor, k_new: torch.Tensor,
           v_new: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """One layer's paged attention over the packed batch: writes this step's K/V
    (``k_new``/``v_new``: ``[T, Hkv, D]``) into the pool at ``meta.slot_mapping`` and attends
    each sequence's queries (``q``: ``[T, H, D]``, any strides) over that sequence's blocks.
    Returns ``[T, H, D]``."""
    meta.num_calls += 1
    k_cache, v_cache = meta.kv_cache.layer(layer_idx)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if k_new.shape[1] != num_kv_heads or k_new.shape[2] != head_dim:
        raise RuntimeError(f"layer {layer_idx}: key shape {tuple(k_new.shape)} does not "
                           f"match the KV pool ({num_kv_heads} heads x {head_dim})")
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, k_new)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.slot_mapping, v_new)
    gqa = q.shape[1] != num_kv_heads
    out = q.new_empty(q.shape)  # [T, H, D]

    if meta.native_decode is not None:
        d = meta.native_decode
        kernels.paged_decode_attention(
            out[d.start:d.end], q[d.start:d.end].contiguous(), k_cache, v_cache,
            d.block_tables, d.context_lens, scaling if scaling is not None else head_dim ** -0.5,
            d.row_tables)
    for group in meta.decodes:
        kd = _gather(k_cache, group.block_tables)  # [n, Hkv, L, D]
        vd = _gather(v_cache, group.block_tables)
        if group.context_len is not None:
            kd = kd[:, :, :group.context_len]
            vd = vd[:, :, :group.context_len]
        n = group.end - group.start
        # One query token per sequence: the query heads that share a KV head become the
        # "query positions" of that head ([n, Hkv, H / Hkv, D]), so grouped-query attention
        # needs no head expansion (SDPA's enable_gqa path copies the gathered K/V).
        qd = q[group.start:group.end].reshape(n, num_kv_heads, -1, head_dim)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=group.mask, scale=scaling)
        out[group.start:group.end] = od.reshape(n, -1, head_dim)  # [n, H, D]
    for chunk in meta.prefills:
        qp = q[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, t, D]
        if chunk.num_cached == 0:
            kp = k_new[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)  # [1, Hkv, t, D]
            vp = v_new[chunk.start:chunk.end].transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scaling,
                                                enable_gqa=gqa)
        else:
            table = chunk.block_table.unsqueeze(0)
            ctx = chunk.num_cached + chunk.end - chunk.start
            kp = _gather(k_cache, table)[:, :, :ctx]  # [1, Hkv, ctx, D]
            vp = _gather(v_cache, table)[:, :, :ctx]
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=chunk.mask, scale=scaling,
                                                enable_gqa=gqa)
        out[chunk.start:chunk.end] = op[0].transpose(0, 1)
    return out


def register() -> None:
    """Register ``paged_attention`` with transformers under ``ATTN_IMPLEMENTATION``."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
