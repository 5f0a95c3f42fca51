"""The per-sequence healer: closes segments, scores them, and decides keep / erase / restore.

The healer decides, the scheduler acts: ``on_token`` returns a ``HealDecision`` and the engine
truncates the sequence through the scheduler (the prefix's KV blocks stay, blocks past the cut
return to the pool). Memory stays O(live length): an erased attempt keeps only its token ids
and statistics (for the log and for "lowest-score attempt wins"), never its KV blocks; a
restored attempt's tokens are recomputed like a prefill chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..outputs import ErasureEvent, Segment
from .params import HealingParams
from .segmenter import segment_score
from .threshold import ThresholdEstimator


@dataclass(slots=True)
class Attempt:
    token_ids: list[int]
    logprobs: list[float]
    nll: list[float]
    entropy: list[float]
    score: float


@dataclass(slots=True)
class HealDecision:
    action: str  # "erase" or "restore"
    position: int  # output index the sequence is cut back to (the segment start)
    restore: Attempt | None = None  # for "restore": the attempt whose tokens come back


@dataclass
class Healer:
    """Segment state and erase budget of one sequence."""

    params: HealingParams
    temperature: float
    estimator: ThresholdEstimator
    max_tokens: int
    segment_start: int = 0  # output index where the open segment starts
    attempts: list[Attempt] = field(default_factory=list)  # erased attempts of this segment
    pending_events: list[ErasureEvent] = field(default_factory=list)
    num_erasures: int = 0
    num_erased_tokens: int = 0
    num_segments: int = 0
    mu: float = 0.0
    var: float = 0.0
    frozen: bool = False  # past the answer marker: nothing more is erased
    banned: tuple[int, int] | None = None  # (output index, token id) not to resample
    can_regenerate: bool = True  # False for greedy decoding without a retry temperature

    def threshold(self) -> float:
        p = self.params
        terms = {}
        q = p.threshold
        if q is None:
            quantile = min(0.999, p.quantile + p.hysteresis * len(self.attempts))
            q = self.estimator.quantile(p.score, self.temperature, quantile)
        if q is not None:
            terms["quantile"] = q
        if self.num_segments >= p.min_segments:
            terms["sequence"] = self.mu + p.kappa * math.sqrt(self.var)
        if p.combine in ("quantile", "sequence"):
            return terms.get(p.combine, math.inf)
        if not terms:
            return math.inf
        return max(terms.values()) if p.combine == "max" else min(terms.values())

    def on_token(self, seq, is_boundary_token: bool) -> HealDecision | None:
        """Called after each appended token of a running sequence."""
        p = self.params
        n = seq.num_output_tokens - self.segment_start
        if self.frozen:
            return None
        closes = n >= p.max_segment_tokens or (n >= p.min_segment_tokens and is_boundary_token)
        if not closes:
            return None
        return self._judge(seq)

    def _judge(self, seq) -> HealDecision | None:
        p = self.params
        start, end = self.segment_start, seq.num_output_tokens
        nll, ent = seq.nll[start:end], seq.entropy[start:end]
        score = segment_score(p.score, nll, ent)
        tau = self.threshold()
        if score <= tau:
            self._accept(seq, score, tau)
            return None
        current = Attempt(seq.output_token_ids[start:end], seq.logprobs[start:end], nll, ent,
                          score)
        if self._can_erase(seq, end - start):
            self._log_erasure(current, start, tau)
            self.attempts.append(current)
            if p.ban_top_nll_token:
                k = max(range(len(nll)), key=nll.__getitem__)
                self.banned = (start + k, current.token_ids[k])
            return HealDecision("erase", start)
        # Budget spent: the lowest-score attempt wins.
        best = min(self.attempts, key=lambda a: a.score, default=None)
        if best is not None and best.score < score:
            # The winner was logged as erased; it comes back and the current attempt goes.
            self.pending_events = [e for e in self.pending_events
                                   if e.erased_token_ids != best.token_ids]
            self._log_erasure(current, start, tau)
            return HealDecision("restore", start, best)
        self._accept(seq, score, tau)
        return None

    def _log_erasure(self, attempt: Attempt, start: int, tau: float) -> None:
        self.num_erasures += 1
        self.num_erased_tokens += len(attempt.token_ids)
        self.pending_events.append(ErasureEvent(
            position=start, erased_token_ids=attempt.token_ids, erased_nll=list(attempt.nll),
            erased_entropy=list(attempt.entropy), score=attempt.score, threshold=tau,
            attempt=len(self.pending_events) + 1))

    def _can_erase(self, seq, length: int) -> bool:
        p = self.params
        if not self.can_regenerate:
            return False
        computed = seq.num_model_tokens - seq.num_prompt_tokens
        if len(self.attempts) >= p.max_retries_per_segment or self.num_erasures >= p.max_erasures:
            return False
        if p.max_computed_tokens is not None and computed + length > p.max_computed_tokens:
            return False
        # Erased tokens stay within max_erased_fraction of the computed tokens (counted
        # against at least max_tokens, so the early segments, where most mistakes are, can
        # be healed too).
        return self.num_erased_tokens + length <= p.max_erased_fraction * max(computed,
                                                                            self.max_tokens)

    def _accept(self, seq, score: float, tau: float) -> None:
        start, end = self.segment_start, seq.num_output_tokens
        p = self.params
        if self.num_segments == 0:
            self.mu, self.var = score, 0.0
        else:
            diff = score - self.mu
            self.mu += (1 - p.ema_beta) * diff
            self.var = p.ema_beta * (self.var + (1 - p.ema_beta) * diff * diff)
        self.num_segments += 1
        self.estimator.observe(p.score, self.temperature, score)
        for event in self.pending_events:
            event.replacement_token_ids = seq.output_token_ids[start:end]
            event.replacement_nll = seq.nll[start:end]
            event.replacement_entropy = seq.entropy[start:end]
            event.replacement_score = score
        seq.erasures.extend(self.pending_events)
        seq.segments.append(Segment(start, end, score, None if math.isinf(tau) else tau))
        self.pending_events = []
        self.attempts = []
        self.banned = None
        self.segment_start = end
        seq.num_stable_tokens = end
        if p.answer_marker and p.answer_marker in seq.detokenizer.text:
            self.frozen = True
            seq.num_stable_tokens = seq.num_output_tokens

    def accept_restored(self, seq) -> None:
        """After a restore the segment is final: accept it as it stands."""
        start, end = self.segment_start, seq.num_output_tokens
        score = segment_score(self.params.score, seq.nll[start:end], seq.entropy[start:end])
        self._accept(seq, score, self.threshold())

    def banned_token(self, seq) -> int | None:
        if self.banned is not None and self.banned[0] == seq.num_output_tokens:
            return self.banned[1]
        return None

    def finish(self, seq) -> None:
        """The sequence ended (stop or length): its open segment is kept as it stands."""
        start, end = self.segment_start, seq.num_output_tokens
        if end > start or self.pending_events:
            score = segment_score(self.params.score, seq.nll[start:end], seq.entropy[start:end])
            self._accept(seq, score, self.threshold())
