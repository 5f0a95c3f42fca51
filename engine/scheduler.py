"""Continuous batching under a token budget, with preemption by recompute.

There are no prefill and decode phases: each step, every running sequence's
``num_computed_tokens`` catches up towards its length, as far as the step's token budget
allows (a long prompt is prefilled in chunks across steps; a decoding sequence needs one
token). Running sequences go first, in arrival order; waiting ones join while budget, sequence
slots and KV blocks last. When the pool cannot hold a running sequence's next tokens, the most
recently admitted running sequence is preempted: its blocks are freed and it goes back to the
head of the waiting queue, to be recomputed (prompt and output so far) when it is admitted
again. With prefix caching, a sequence being admitted (new or preempted) first takes the
cached blocks of its longest cached prefix and starts computing after them. A request whose prompt plus ``max_tokens`` cannot fit the pool alone is refused at
admission, so the loop always makes progress and never runs out of memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int  # tokens fed this step, from seq.num_computed_tokens on

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence (its logits are sampled)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Owns the waiting queue, the running list and the block manager."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            start = seq.num_computed_tokens
            num_new = min(len(seq.token_ids) - start, budget)
            while True:
                # Recounted after each preemption: a victim sharing seq's block may have freed it.
                num_needed = bm.num_blocks_to_write(seq.block_table, start, start + num_new)
                if num_needed <= bm.num_free_blocks:
                    break
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            if num_needed:  # else the positions are in blocks of seq's own: nothing to prepare
                out.block_copies += bm.prepare_write(seq.block_table, start, start + num_new)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            i += 1
        # Admit waiting sequences, oldest first, unless this step had to preempt.
        while self.waiting and budget > 0 and not out.preempted:
            seq = self.waiting[0]
            # A request's first sample reserves slots for its n - 1 forks.
            if len(self.running) + 1 + seq.num_children_to_fork > self.max_num_seqs:
                break
            cached = 0
            lookup = (bm.enable_caching and seq.num_computed_tokens == 0
                      and seq.params.prompt_logprobs is None)  # cached rows have no logits
            if lookup:
                cached = bm.allocate_cached_prefix(seq.token_ids, seq.block_table,
                                                   seq.block_hashes)
                seq.num_computed_tokens = cached
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.can_write(seq.block_table, seq.num_computed_tokens,
                                seq.num_computed_tokens + num_new):
                if cached:  # give the hits back (they stay cached)
                    bm.free(seq.block_table)
                    seq.block_hashes.clear()
                    seq.num_computed_tokens = 0
                break
            if lookup:
                bm.num_queried_tokens += seq.num_tokens
                bm.num_hit_tokens += cached
            self.waiting.popleft()
            out.block_copies += bm.prepare_write(seq.block_table, seq.num_computed_tokens,
                                                 seq.num_computed_tokens + num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return out

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Start ``child`` right after ``parent``'s prompt prefill, sharing its blocks."""
        child.block_table = self.block_manager.fork(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed_tokens = parent.num_computed_tokens
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Index ``seq``'s blocks that became full and computed (prefix caching)."""
        self.block_manager.cache_full_blocks(seq.token_ids, seq.block_table, seq.block_hashes,
                                             seq.num_computed_tokens)

    def finish(self, seq: Sequence) -> None:
        """Release a finished (or aborted) sequence's blocks and drop it from the queues."""
        self.block_manager.free(seq.block_table)
        seq.block_hashes.clear()
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def truncate(self, seq: Sequence, num_output_tokens: int) -> None:
        """Erase ``seq``'s output past ``num_output_tokens`` tokens: the kept prefix's blocks
        stay as they are, the blocks past the cut return to the pool. Only the last kept
        token is fed again (its logits are needed); nothing before it is recomputed.

        Prefix caching: full blocks before the cut stay indexed (their contents are
        unchanged); released ones stay valid in the cache; the block the cut falls in is
        un-indexed or copied before it is written (``BlockManager.truncate``), and the
        sequence's block hashes are cut to its full computed blocks."""
        seq.truncate_output(num_output_tokens)
        self.block_manager.truncate(seq.block_table, seq.num_computed_tokens)
        del seq.block_hashes[seq.num_computed_tokens // self.block_manager.block_size:]
