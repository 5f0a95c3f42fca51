"""Block ids, reference counts and block tables. Pure bookkeeping: no torch here.

A block holds ``block_size`` consecutive tokens of one sequence's KV cache. Blocks are shared
between sequences by reference count (the ``n`` samples of a request share their prompt's
blocks); a shared block is copied before it is written (copy-on-write). Invariant: a block is
in the free list iff its reference count is 0.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Free list and reference counts over ``num_blocks`` KV blocks."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        block_id = self.free_ids.popleft()
        assert self.ref_counts[block_id] == 0
        self.ref_counts[block_id] = 1
        return block_id

    def _release(self, block_id: int) -> None:
        assert self.ref_counts[block_id] > 0, f"double free of block {block_id}"
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_ids.append(block_id)

    def num_blocks_to_write(self, block_table: list[int], start: int, end: int) -> int:
        """New blocks that writing token positions ``[start, end)`` would take: blocks to
        append past the table's end, plus one copy if the first written block is shared."""
        extra = max(0, self.blocks_for(end) - len(block_table))
        first = start // self.block_size
        if first < len(block_table) and self.ref_counts[block_table[first]] > 1:
            extra += 1
        return extra

    def can_write(self, block_table: list[int], start: int, end: int) -> bool:
        return self.num_blocks_to_write(block_table, start, end) <= len(self.free_ids)

    def prepare_write(self, block_table: list[int], start: int,
                      end: int) -> list[tuple[int, int]]:
        """Make positions ``[start, end)`` writable: copy a shared first block (returns the
        ``(src, dst)`` block copies the KV cache must perform) and append new blocks.
        All or nothing: call ``can_write`` first."""
        if not self.can_write(block_table, start, end):
            raise RuntimeError("prepare_write without enough free blocks")
        copies = []
        first = start // self.block_size
        # Only the first written block can be shared: blocks past it were allocated for this
        # sequence alone (append below) or were freed by truncate.
        if first < len(block_table) and self.ref_counts[block_table[first]] > 1:
            src = block_table[first]
            dst = self._take()
            self._release(src)
            block_table[first] = dst
            copies.append((src, dst))
        while len(block_table) < self.blocks_for(end):
            block_table.append(self._take())
        return copies

    def truncate(self, block_table: list[int], num_tokens: int) -> list[int]:
        """Keep the blocks holding the first ``num_tokens`` tokens, release the rest.
        Returns the released block ids."""
        keep = self.blocks_for(num_tokens)
        released = block_table[keep:]
        del block_table[keep:]
        for block_id in reversed(released):
            self._release(block_id)
        return released

    def fork(self, block_table: list[int]) -> list[int]:
        """A new table sharing every block of ``block_table`` (reference counts + 1)."""
        for block_id in block_table:
            assert self.ref_counts[block_id] > 0
            self.ref_counts[block_id] += 1
        return list(block_table)

    def free(self, block_table: list[int]) -> None:
        """Release every block of the table and empty it."""
        self.truncate(block_table, 0)

    def check_invariants(self) -> None:
        """Assert the free list and the reference counts agree (used by tests)."""
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "a block is twice in the free list"
        for block_id, count in enumerate(self.ref_counts):
            assert count >= 0
            assert (count == 0) == (block_id in free), f"block {block_id}: ref {count}"
