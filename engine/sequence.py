"""A ``Sequence``: one sample being generated. Only the scheduler mutates it."""

from __future__ import annotations

import enum
import time

import torch

from .detokenizer import IncrementalDetokenizer
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Token ids (prompt + output), how many of them have KV in the pool
    (``num_computed_tokens``), the block table, and per-output-token statistics.

    Invariants: ``num_computed_tokens <= num_tokens``; while running between steps,
    ``num_computed_tokens == num_tokens - 1`` after a token was sampled (the newest token's
    KV is written by the next step); the block table covers ``num_computed_tokens``.
    """

    def __init__(self, seq_id: int, request_id: str, index: int, prompt_token_ids: list[int],
                 params: SamplingParams, generator: torch.Generator | None,
                 detokenizer: IncrementalDetokenizer, arrival_time: float | None = None):
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # which of the request's n samples
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Prefix-cache hashes of the leading full, computed blocks of ``block_table``.
        self.block_hashes: list[bytes] = []
        self.params = params
        self.generator = generator
        self.detokenizer = detokenizer
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.num_children_to_fork = 0  # n - 1 for a request's first sample until its prefill
        self.parent: Sequence | None = None
        # Per output token.
        self.logprobs: list[float] = []
        self.nll: list[float] = []
        self.entropy: list[float] = []
        self.top_logprobs: list[dict[int, float]] = []
        # Per prompt token (filled when prompt_logprobs is asked for).
        self.prompt_token_logprobs: list[float | None] = [None]
        self.prompt_top_logprobs: list[dict[int, float] | None] = [None]
        # Streaming: output tokens / characters already handed out, tokens safe to hand out.
        self.num_released_tokens = 0
        self.num_released_chars = 0
        self.num_stable_tokens = 0
        self.stop_text_end: int | None = None  # cut position of the text after a stop string
        self.released_final = False
        self.erasures: list = []  # ErasureEvent, filled by the healer
        self.segments: list = []  # Segment, filled by the healer
        self.num_model_tokens = 0  # tokens fed to the model for this sample (recompute included)
        # Output tokens generated for this sample, erased ones and restored ones included:
        # the "computed tokens" that healing is charged with (equal to the returned tokens
        # when nothing is erased).
        self.num_generated_tokens = 0
        self.num_preemptions = 0
        self.healer = None  # set by the engine when healing is on
        self.temperature_override: float | None = None  # a retry's temperature
        # (output index, version): the weights version from each output position on.
        self.weight_versions: list[tuple[int, str]] = []
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    # -- derived -----------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def temperature(self) -> float:
        if self.temperature_override is not None:
            return self.temperature_override
        return self.params.temperature

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def output_text(self) -> str:
        text = self.detokenizer.text
        return text if self.stop_text_end is None else text[:self.stop_text_end]

    def stable_text_len(self) -> int:
        """Characters of the output text that no erasure can take back."""
        if self.num_stable_tokens >= self.num_output_tokens:
            return len(self.output_text)
        stable_ids = self.output_token_ids[:self.num_stable_tokens]
        return len(self.detokenizer._decode(stable_ids))

    # -- mutations (scheduler only) -----------------------------------------------------
    def append_token(self, token_id: int, logprob: float, nll: float, entropy: float,
                     top: dict[int, float] | None) -> str:
        """Append a sampled token and its statistics; returns the text it adds."""
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        self.nll.append(nll)
        self.entropy.append(entropy)
        if top is not None:
            self.top_logprobs.append(top)
        return self.detokenizer.update(self.token_ids, self.num_prompt_tokens)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Keep the first ``num_output_tokens`` output tokens (an erasure). The last kept
        token is fed again so that its logits are recomputed; nothing before it is."""
        keep = self.num_prompt_tokens + num_output_tokens
        assert num_output_tokens >= 0 and keep <= self.num_tokens
        del self.token_ids[keep:]
        for values in (self.logprobs, self.nll, self.entropy, self.top_logprobs):
            del values[num_output_tokens:]
        self.num_computed_tokens = min(self.num_computed_tokens, keep - 1)
        self.num_stable_tokens = min(self.num_stable_tokens, num_output_tokens)
        self.detokenizer.reset(self.output_token_ids)

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finish_time = time.monotonic()
