"""The paged K/V pool: one tensor allocated once from a memory budget."""

from __future__ import annotations

import torch


class KVCache:
    """``num_blocks`` blocks of ``block_size`` tokens for every layer, K and V.

    Layout: ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``. Zero-filled:
    masked-out slots of a gathered block still enter the attention matmul with weight 0, and
    uninitialised memory could hold NaN (0 * NaN = NaN).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.pool = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, each ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        return self.pool[layer_idx, 0], self.pool[layer_idx, 1]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: copy block ``src`` to block ``dst`` in every layer."""
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.pool.device)
        dst = torch.tensor([d for _, d in copies], device=self.pool.device)
        self.pool[:, :, dst] = self.pool[:, :, src]
