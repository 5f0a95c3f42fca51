"""Block ids, reference counts, block tables and the prefix cache. Pure bookkeeping: no torch.

A block holds ``block_size`` consecutive tokens of one sequence's KV cache. Blocks are shared
between sequences by reference count (the ``n`` samples of a request share their prompt's
blocks; with prefix caching, requests share the full blocks of a common prefix); a shared block
is copied before it is written (copy-on-write).

Prefix caching (``enable_caching``): a full block whose KV is computed is indexed by a hash of
(its parent block's hash, its token ids, the cache version). The parent chain makes the key
cover the whole prefix up to the block's end. A new sequence looks up its full blocks in order
and reuses every hit. A released block that is indexed is not wiped: it becomes *evictable*
(reference count 0, still in the index, in an LRU order) and is either hit again or evicted,
least recently used first, when a free block is needed and the free list is empty.

Invariant: every block is exactly one of in use (ref > 0), free-uncached (in ``free_ids``, not
indexed), evictable-cached (ref 0, in ``evictable`` and in the hash index). Usable blocks
(``num_free_blocks``) = free + evictable. An indexed block's contents always match its hash: a
block written again after a truncate is un-indexed first (``truncate``) or copied (shared).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


class BlockManager:
    """Free list, reference counts and the prefix-cache index over ``num_blocks`` KV blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_counts = [0] * num_blocks
        self.free_ids: deque[int] = deque(range(num_blocks))
        # Prefix cache: hash -> block, block -> hash (None: not indexed), LRU of evictable.
        self.cached: dict[bytes, int] = {}
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.cache_version = ""
        self.num_hit_tokens = 0  # prompt tokens found in the cache (admitted requests)
        self.num_queried_tokens = 0  # prompt tokens looked up
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        """Usable blocks: free and evictable."""
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        if self.free_ids:
            block_id = self.free_ids.popleft()
        else:  # evict the least recently used cached block
            block_id, _ = self.evictable.popitem(last=False)
            self._unindex(block_id)
            self.num_evictions += 1
        assert self.ref_counts[block_id] == 0
        self.ref_counts[block_id] = 1
        return block_id

    def _release(self, block_id: int) -> None:
        assert self.ref_counts[block_id] > 0, f"double free of block {block_id}"
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            if self.block_hash[block_id] is not None:
                self.evictable[block_id] = None  # most recently used end
            else:
                self.free_ids.append(block_id)

    def _unindex(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            del self.cached[h]
            self.block_hash[block_id] = None

    def num_blocks_to_write(self, block_table: list[int], start: int, end: int) -> int:
        """New blocks that writing token positions ``[start, end)`` would take: blocks to
        append past the table's end, plus one copy if the first written block is shared."""
        extra = max(0, self.blocks_for(end) - len(block_table))
        first = start // self.block_size
        if first < len(block_table) and self._must_copy(block_table[first]):
            extra += 1
        return extra

    def _must_copy(self, block_id: int) -> bool:
        """A block about to be written is copied first if others share it or it is indexed
        (its contents must keep matching its hash)."""
        return self.ref_counts[block_id] > 1 or self.block_hash[block_id] is not None

    def can_write(self, block_table: list[int], start: int, end: int) -> bool:
        return self.num_blocks_to_write(block_table, start, end) <= self.num_free_blocks

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
        # sequence alone (append below) or were freed by truncate; blocks before it are
        # computed and never written again.
        if first < len(block_table) and self._must_copy(block_table[first]):
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
        Returns the released block ids.

        Prefix cache: released blocks that are indexed stay valid (their contents still match
        their hash) and become evictable. A kept block that is cut in the middle
        (``num_tokens`` not a multiple of the block size) will be written again from
        ``num_tokens`` on, so it must not stay indexed under its old hash: if this table is
        its only user it is un-indexed here (it becomes a plain block of this sequence); if it
        is shared, it keeps its index entry and the next ``prepare_write`` copies it (an indexed
        block is always copied before a write), so the other users and the cache keep the old
        contents."""
        keep = self.blocks_for(num_tokens)
        released = block_table[keep:]
        del block_table[keep:]
        for block_id in reversed(released):
            self._release(block_id)
        if num_tokens % self.block_size and block_table:
            last = block_table[-1]
            if self.ref_counts[last] == 1:
                self._unindex(last)
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

    # -- prefix cache --------------------------------------------------------------------
    def block_key(self, parent: bytes | None, token_ids: list[int]) -> bytes:
        """Hash of a full block: its parent's hash, its token ids and the cache version."""
        h = hashlib.blake2b(digest_size=16)
        h.update(parent or b"")
        h.update(array("q", token_ids).tobytes())
        h.update(self.cache_version.encode())
        return h.digest()

    def allocate_cached_prefix(self, token_ids: list[int], block_table: list[int],
                               block_hashes: list[bytes]) -> int:
        """For a sequence with no blocks yet: append to ``block_table`` every leading full
        block of ``token_ids`` found in the cache (reference count + 1; an evictable hit
        leaves the LRU), and their hashes to ``block_hashes``. At least the last token is left
        uncached, so that it is fed and its logits come out. Returns the cached tokens."""
        assert not block_table and not block_hashes
        if not self.enable_caching:
            return 0
        bs = self.block_size
        parent = None
        for j in range((len(token_ids) - 1) // bs):
            key = self.block_key(parent, token_ids[j * bs:(j + 1) * bs])
            block_id = self.cached.get(key)
            if block_id is None:
                break
            if self.ref_counts[block_id] == 0:
                del self.evictable[block_id]
            self.ref_counts[block_id] += 1
            block_table.append(block_id)
            block_hashes.append(key)
            parent = key
        return len(block_table) * bs

    def cache_full_blocks(self, token_ids: list[int], block_table: list[int],
                          block_hashes: list[bytes], num_computed: int) -> None:
        """Index the blocks of a sequence that became full and computed (``block_hashes``
        holds the hashes of the leading ones already done; extended here). A block whose key
        is already indexed under another block (the same prefix computed twice) stays
        unindexed: the first copy serves later hits."""
        if not self.enable_caching:
            return
        bs = self.block_size
        for j in range(len(block_hashes), num_computed // bs):
            parent = block_hashes[-1] if block_hashes else None
            key = self.block_key(parent, token_ids[j * bs:(j + 1) * bs])
            block_hashes.append(key)
            block_id = block_table[j]
            if self.block_hash[block_id] is not None:
                assert self.block_hash[block_id] == key, "cached block changed contents"
            elif key not in self.cached:
                self.cached[key] = block_id
                self.block_hash[block_id] = key

    def reset_prefix_cache(self, version: str) -> None:
        """Forget every cached block (evictable ones return to the free list, blocks in use
        stay with their sequences, unindexed) and key new blocks by ``version``."""
        for block_id in list(self.cached.values()):
            self._unindex(block_id)
        while self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            self.free_ids.append(block_id)
        self.cache_version = version

    def check_invariants(self) -> None:
        """Assert the free list, the evictable pool, the index and the reference counts
        agree (used by tests)."""
        free = set(self.free_ids)
        assert len(free) == len(self.free_ids), "a block is twice in the free list"
        assert not free & set(self.evictable), "a block is free and evictable"
        assert len(self.cached) == sum(h is not None for h in self.block_hash)
        for h, block_id in self.cached.items():
            assert self.block_hash[block_id] == h
        for block_id, count in enumerate(self.ref_counts):
            assert count >= 0
            in_use = count > 0
            is_free = block_id in free
            is_evictable = block_id in self.evictable
            assert in_use + is_free + is_evictable == 1, f"block {block_id}: ref {count}"
            if is_free:
                assert self.block_hash[block_id] is None, f"free block {block_id} is indexed"
            if is_evictable:
                assert self.block_hash[block_id] is not None, f"evictable {block_id} unindexed"
        assert self.num_free_blocks == len(free) + len(self.evictable)
        if not self.enable_caching:
            assert not self.cached and not self.evictable
