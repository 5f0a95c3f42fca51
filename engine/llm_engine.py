"""The synchronous engine: ``add_request``, ``abort``, and ``step()`` = schedule, run, sample,
update. One step returns the new, safe-to-show part of every request it advanced."""

from __future__ import annotations

import logging
import random
import time
from array import array
from dataclasses import dataclass

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .errors import InvalidRequest, QueueFull, WeightUpdateError
from .healer import HealDecision, Healer, ThresholdEstimator
from .limits import RequestLimits
from .model_runner import ModelRunner
from .outputs import RequestOutput
from .request import Request
from .sampler import SamplingBatch, sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineStats:
    num_running_requests: int
    num_waiting_requests: int
    num_running_seqs: int
    num_waiting_seqs: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_preemptions: int
    num_prompt_tokens: int
    num_generation_tokens: int
    weight_version: str
    num_segments: int = 0
    num_erasures: int = 0
    num_erased_tokens: int = 0
    num_recomputed_tokens: int = 0
    prefix_cache_hit_tokens: int = 0  # prompt tokens found in the prefix cache
    prefix_cache_queried_tokens: int = 0  # prompt tokens looked up in it
    # Requests never scheduled yet: what the waiting-queue bound admits against. (Requests
    # preempted, or re-queued by a weight swap, were admitted already and count as waiting
    # above, but a burst of them must not turn new requests away.)
    num_queued_requests: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_kv_blocks / self.num_kv_blocks


class LLMEngine:
    """Owns the model runner, the scheduler, the tokenizer and the live requests."""

    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        self.runner = ModelRunner(config)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, local_files_only=True,
                                                       trust_remote_code=False)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.vocab_size
        kv = self.runner.kv_cache
        self.block_manager = BlockManager(kv.num_blocks, kv.block_size,
                                          enable_caching=config.enable_prefix_caching)
        self.limits = RequestLimits(self.vocab_size, self.max_model_len,
                                    kv.num_blocks * kv.block_size, config.max_num_seqs)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        self.eos_token_ids = self._eos_ids()
        self.requests: dict[str, Request] = {}
        self.weight_version = "0"
        self._rng = random.Random(config.seed)
        self._next_seq_id = 0
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.estimator = ThresholdEstimator(config.model)
        self._boundary_ids: dict[tuple[str, ...], frozenset[int]] = {}
        self.num_segments = 0
        self.num_erasures = 0
        self.num_erased_tokens = 0
        self.num_recomputed_tokens = 0

    def _eos_ids(self) -> set[int]:
        ids = set()
        gen = getattr(self.runner.model, "generation_config", None)
        for source in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    # -- requests ------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt must not be empty", param="prompt")
            return prompt, self.tokenizer(prompt)["input_ids"]
        return None, self.limits.prompt_ids(prompt)

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams) -> None:
        """Validate and queue a request. Raises ``InvalidRequest`` or ``QueueFull``."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequest("params must be a SamplingParams", param="params")
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already running",
                                 param="request_id")
        text, ids = self.tokenize(prompt)
        self.check_lengths(len(ids), params)
        if len(self.requests) >= self.config.max_waiting + self.config.max_num_seqs \
                or self._num_queued_requests() >= self.config.max_waiting:
            raise QueueFull(f"the waiting queue is full ({self.config.max_waiting} requests)")
        seqs = [self._new_sequence(request_id, i, ids, params) for i in range(params.n)]
        seqs[0].num_children_to_fork = params.n - 1
        request = Request(request_id, text, ids, params, seqs)
        request.weight_version = self.weight_version
        self.requests[request_id] = request
        self.num_prompt_tokens += len(ids)
        self.scheduler.add(seqs[0])

    def check_lengths(self, num_prompt: int, params: SamplingParams) -> None:
        """See ``RequestLimits.check_lengths``."""
        self.limits.check_lengths(num_prompt, params)

    def _new_sequence(self, request_id: str, index: int, ids: list[int],
                      params: SamplingParams) -> Sequence:
        generator = None
        retry_temperature = params.healing.retry_temperature if params.heals else None
        if not params.is_greedy or retry_temperature is not None:
            generator = torch.Generator(device=self.runner.device)
            if params.seed is not None:
                generator.manual_seed((params.seed * 1_000_003 + index) % (2**63))
            else:
                generator.manual_seed(self._rng.getrandbits(63))
        detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
        seq = Sequence(self._next_seq_id, request_id, index, ids, params, generator, detok)
        seq.weight_versions.append((0, self.weight_version))
        self._next_seq_id += 1
        if params.heals:
            seq.healer = Healer(params.healing, params.temperature, self.estimator,
                                params.max_tokens)
            # Greedy decoding without a retry temperature would regenerate the same tokens:
            # segments are scored and logged, never erased.
            seq.healer.can_regenerate = generator is not None
            self._boundaries(params.healing.segment_boundary)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now; its blocks return to the pool. Returns its last delta."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            self.scheduler.finish(seq)
            if not seq.is_finished:
                seq.finish("abort")
        return request.make_delta(self.weight_version)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        now = time.monotonic()
        run = self.runner.execute(sched)
        to_sample: list[tuple[Sequence, int]] = []
        touched: dict[str, Request] = {}
        caching = self.block_manager.enable_caching
        for item, row in zip(sched.scheduled, run.sample_rows):
            seq = item.seq
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            seq.num_computed_tokens += item.num_new_tokens
            seq.num_model_tokens += item.num_new_tokens
            if caching:
                self.scheduler.cache_computed_blocks(seq)
            if row >= 0:
                to_sample.append((seq, row))
                request = self.requests[seq.request_id]
                touched[seq.request_id] = request
                if seq.num_children_to_fork:
                    for child in request.seqs[1:]:
                        self.scheduler.fork(seq, child)
                        to_sample.append((child, row))
                    seq.num_children_to_fork = 0
        for i, first_row, num_rows, start in run.prompt_rows:
            self._record_prompt_logprobs(sched.scheduled[i].seq, start,
                                         run.logits[first_row:first_row + num_rows])
        if to_sample:
            self._sample_and_append(to_sample, run.logits)
        outputs = []
        for request in touched.values():
            delta = request.make_delta(self.weight_version)
            if delta is not None:  # a finished request always has a (final) delta
                outputs.append(delta)
                if delta.finished:
                    del self.requests[request.request_id]
        return outputs

    def _record_prompt_logprobs(self, seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Row r holds the logits at prompt position start + r (predicting token + 1)."""
        done = len(seq.prompt_token_logprobs) - 1  # positions already recorded
        if start + logits.shape[0] <= done:
            return  # recomputed after a preemption
        logits = logits[done - start:]
        start = done
        logprobs = logits.log_softmax(-1)  # [rows, V]
        targets = torch.tensor(seq.token_ids[start + 1:start + 1 + logits.shape[0]])
        chosen = logprobs.gather(1, targets.unsqueeze(1).to(logprobs.device)).squeeze(1)
        k = seq.params.prompt_logprobs
        top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
        for r in range(logits.shape[0]):
            seq.prompt_token_logprobs.append(float(chosen[r]))
            entry = {int(targets[r]): float(chosen[r])}
            if k:
                entry.update(zip(top_ids[r].tolist(), top_lp[r].tolist()))
            seq.prompt_top_logprobs.append(entry)

    def _sample_and_append(self, to_sample: list[tuple[Sequence, int]],
                           logits: torch.Tensor) -> None:
        seqs = [s for s, _ in to_sample]
        rows = [r for _, r in to_sample]
        batch = self._sampling_batch(seqs, logits.device)
        if rows != list(range(logits.shape[0])):  # else every row, in order: no copy
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        out = sample(logits, batch)
        token_ids = out.token_ids.tolist()
        # One host copy (one sync off CPU) for the three float statistics.
        logprobs, nll, entropy = torch.stack((out.logprobs, out.nll, out.entropy)).tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        now = time.monotonic()
        for j, seq in enumerate(seqs):
            if seq.params.max_tokens == 0:  # prompt scoring only
                self.scheduler.finish(seq)
                seq.finish("length")
                continue
            top = None
            if seq.params.logprobs is not None:
                k = seq.params.logprobs
                top = {token_ids[j]: logprobs[j]}
                if k:
                    top.update(zip(top_ids[j][:k], top_lp[j][:k]))
            new_text = seq.append_token(token_ids[j], logprobs[j], nll[j], entropy[j], top)
            seq.num_generated_tokens += 1
            self.num_generation_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            self._check_stop(seq, token_ids[j], new_text)
            if seq.is_finished:
                if seq.healer is not None:
                    self._heal_finish(seq)
                self.scheduler.finish(seq)
            elif seq.healer is None:
                seq.num_stable_tokens = seq.num_output_tokens
            else:
                boundary = token_ids[j] in self._boundaries(seq.params.healing.segment_boundary)
                decision = seq.healer.on_token(seq, boundary)
                if decision is not None:
                    self._apply_heal(seq, decision)
                elif seq.num_output_tokens == seq.healer.segment_start:
                    self._segment_accepted(seq)

    # -- self-healing --------------------------------------------------------------------
    def _boundaries(self, boundary: list[str]) -> frozenset[int]:
        """Token ids whose text contains a segment boundary (computed once per boundary set)."""
        key = tuple(boundary)
        if key not in self._boundary_ids:
            ids = [i for i in range(len(self.tokenizer))
                   if any(b in self.tokenizer.decode([i]) for b in boundary)]
            self._boundary_ids[key] = frozenset(ids)
        return self._boundary_ids[key]

    def _apply_heal(self, seq: Sequence, decision: HealDecision) -> None:
        """The healer decided; the scheduler acts (truncate, and re-append on restore)."""
        healer = seq.healer
        erased = seq.num_output_tokens - decision.position
        self.scheduler.truncate(seq, decision.position)
        self.num_recomputed_tokens += 1  # the last kept token is fed again
        if decision.action == "erase":
            self.num_erasures += 1
            self.num_erased_tokens += erased
            if seq.params.healing.retry_temperature is not None:
                seq.temperature_override = seq.params.healing.retry_temperature
            return
        # Restore: the lowest-score attempt wins; its tokens come back and are recomputed.
        best = decision.restore
        self.num_erasures += 1
        self.num_erased_tokens += erased
        for tok, lp, nll, ent in zip(best.token_ids, best.logprobs, best.nll, best.entropy):
            seq.append_token(tok, lp, nll, ent, None)
        self.num_recomputed_tokens += len(best.token_ids)
        seq.num_generated_tokens += len(best.token_ids)
        healer.accept_restored(seq)
        self._segment_accepted(seq)

    def _segment_accepted(self, seq: Sequence) -> None:
        self.num_segments += 1
        seq.temperature_override = None

    def _heal_finish(self, seq: Sequence) -> None:
        before = len(seq.segments)
        seq.healer.finish(seq)
        self.num_segments += len(seq.segments) - before

    def _sampling_batch(self, seqs: list[Sequence], device: torch.device) -> SamplingBatch:
        ps = [s.params for s in seqs]
        banned = []
        for s in seqs:
            ban = set()
            if s.num_output_tokens < s.params.min_tokens:
                ban |= set(s.params.stop_token_ids)
                if not s.params.ignore_eos:
                    ban |= self.eos_token_ids
            if s.healer is not None:
                token = s.healer.banned_token(s)
                if token is not None:
                    ban.add(token)
            banned.append(sorted(ban))
        # array -> frombuffer: ~5x faster than torch.tensor(list) (same float32 rounding).
        floats = torch.frombuffer(array("f", [s.temperature for s in seqs]
                                        + [p.top_p for p in ps] + [p.min_p for p in ps]),
                                  dtype=torch.float32).to(device).view(3, len(seqs))
        return SamplingBatch(
            temperatures=floats[0], top_p=floats[1], min_p=floats[2],
            top_k=torch.frombuffer(array("q", [p.top_k for p in ps]),
                                   dtype=torch.long).to(device),
            generators=[s.generator for s in seqs], banned=banned,
            max_num_logprobs=max((p.logprobs or 0) for p in ps),
            any_top_k=any(p.top_k > 0 for p in ps), any_top_p=any(p.top_p < 1 for p in ps),
            any_min_p=any(p.min_p > 0 for p in ps))

    def _check_stop(self, seq: Sequence, token_id: int, new_text: str) -> None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                return seq.finish("stop", token_id)
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return seq.finish("stop", None)
            if params.stop and new_text:
                text = seq.detokenizer.text
                longest = max(len(s) for s in params.stop)
                window_start = max(0, len(text) - len(new_text) - longest + 1)
                hits = [(text.find(s, window_start), s) for s in params.stop]
                hits = [(i, s) for i, s in hits if i >= 0]
                if hits:
                    index, stop = min(hits)
                    seq.stop_text_end = index + len(stop) if params.include_stop_str_in_output \
                        else index
                    return seq.finish("stop", stop)
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish("length")

    # -- weights -------------------------------------------------------------------------
    def update_weights(self, source, version: str) -> None:
        """Swap the model's weights between two steps, atomically: everything is validated
        before the first copy (``WeightUpdateError`` leaves the old weights serving).

        Running sequences keep their tokens but their KV cache is dropped and recomputed with
        the new weights (as after a preemption): a sequence never attends over KV from two
        weight versions, and no request waits for others to finish before the swap.

        Prefix caching: the whole cache index is dropped after the running sequences are
        preempted (their blocks go back to the free list, not to the cache), and new blocks are
        keyed with the new version, so no block computed with older weights is ever hit."""
        from . import weights

        if not isinstance(version, str) or not version:
            raise WeightUpdateError("version must be a non-empty string")
        tensors = weights.load_tensors(source)
        weights.validate(self.runner.model, tensors)
        weights.copy_into(self.runner.model, tensors)
        self.runner.weights_changed()
        for seq in list(self.scheduler.running):
            self.scheduler.running.remove(seq)
            self.scheduler._preempt(seq)
        self.block_manager.reset_prefix_cache(version)
        for request in self.requests.values():
            for seq in request.seqs:
                seq.weight_versions.append((seq.num_output_tokens, version))
        self.weight_version = version
        logger.info("weights updated to version %s (%d tensors; %d request(s) in flight go "
                    "on with them)", version, len(tensors), len(self.requests))

    # -- introspection -------------------------------------------------------------------
    def _num_queued_requests(self) -> int:
        return sum(1 for r in self.requests.values() if r.seqs[0].first_scheduled_time is None)

    def stats(self) -> EngineStats:
        running = {s.request_id for s in self.scheduler.running}
        return EngineStats(
            num_running_requests=len(running),
            num_waiting_requests=len(self.requests) - len(running),
            num_running_seqs=len(self.scheduler.running),
            num_waiting_seqs=len(self.scheduler.waiting),
            num_kv_blocks=self.block_manager.num_blocks,
            num_free_kv_blocks=self.block_manager.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self.num_prompt_tokens,
            num_generation_tokens=self.num_generation_tokens,
            weight_version=self.weight_version, num_segments=self.num_segments,
            num_erasures=self.num_erasures, num_erased_tokens=self.num_erased_tokens,
            num_recomputed_tokens=self.num_recomputed_tokens,
            prefix_cache_hit_tokens=self.block_manager.num_hit_tokens,
            prefix_cache_queried_tokens=self.block_manager.num_queried_tokens,
            num_queued_requests=self._num_queued_requests())
