"""A request: its prompt, parameters and ``n`` sequences; builds its outputs."""

from __future__ import annotations

import time

from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams
from .sequence import Sequence


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, seqs: list[Sequence]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs = seqs
        self.arrival_time = time.monotonic()
        self.weight_version = ""
        self.max_stop_len = max((len(s) for s in params.stop), default=0)

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def make_delta(self, weight_version: str) -> RequestOutput | None:
        """What is new and safe to show since the last delta (None if nothing)."""
        outputs = []
        for seq in self.seqs:
            delta = self._seq_delta(seq)
            if delta is not None:
                outputs.append(delta)
        finished = self.is_finished
        if not outputs and not finished:
            return None
        out = RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs,
                            finished, weight_version=weight_version)
        if finished:
            first = self.seqs[0]
            if self.params.prompt_logprobs is not None:
                out.prompt_token_logprobs = first.prompt_token_logprobs
                out.prompt_logprobs = first.prompt_top_logprobs
            out.metrics = self._metrics()
        return out

    def _seq_delta(self, seq: Sequence) -> CompletionOutput | None:
        finished = seq.is_finished
        stable = seq.num_output_tokens if finished else seq.num_stable_tokens
        text = seq.output_text
        if finished:
            text_end = len(text)
        else:
            text_end = seq.stable_text_len()
            if self.max_stop_len > 1:  # hold back what could be the start of a stop string
                text_end = max(seq.num_released_chars, text_end - (self.max_stop_len - 1))
        t0, c0 = seq.num_released_tokens, seq.num_released_chars
        if stable == t0 and text_end == c0 and not (finished and not seq.released_final):
            return None
        out = CompletionOutput(
            index=seq.index, text=text[c0:text_end],
            token_ids=seq.token_ids[seq.num_prompt_tokens + t0:seq.num_prompt_tokens + stable],
            finish_reason=seq.finish_reason if finished else None,
            stop_reason=seq.stop_reason if finished else None,
            logprobs=seq.logprobs[t0:stable], nll=seq.nll[t0:stable],
            entropy=seq.entropy[t0:stable],
            top_logprobs=seq.top_logprobs[t0:stable] if self.params.logprobs is not None else None,
            num_computed_tokens=seq.num_generated_tokens)
        if finished:
            out.erasures = list(seq.erasures)
            out.segments = list(seq.segments)
            out.weight_versions = list(seq.weight_versions)
            seq.released_final = True
        seq.num_released_tokens, seq.num_released_chars = stable, text_end
        return out

    def _metrics(self) -> dict[str, float]:
        firsts = [s.first_token_time for s in self.seqs if s.first_token_time is not None]
        sched = [s.first_scheduled_time for s in self.seqs if s.first_scheduled_time is not None]
        ends = [s.finish_time for s in self.seqs if s.finish_time is not None]
        metrics = {"arrival_time": self.arrival_time}
        if sched:
            metrics["queue_time_s"] = min(sched) - self.arrival_time
        if firsts:
            metrics["time_to_first_token_s"] = min(firsts) - self.arrival_time
        if ends:
            metrics["e2e_latency_s"] = max(ends) - self.arrival_time
        return metrics
