"""What a request may ask of a started engine: the checks both the engine and a front end in
another process run before a request is queued (they need only these numbers, not the model).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequest
from .sampling_params import SamplingParams


@dataclass(slots=True, frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int  # context length (prompt + output tokens)
    kv_capacity_tokens: int  # tokens the whole KV pool holds
    max_num_seqs: int  # sequences running at once: a request's n samples must fit

    def prompt_ids(self, prompt: list[int]) -> list[int]:
        """A prompt given as token ids, checked; raises ``InvalidRequest``."""
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequest("prompt must be a non-empty string or list of token ids",
                                 param="prompt")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InvalidRequest(f"prompt token id {t!r} is outside the vocabulary "
                                     f"[0, {self.vocab_size})", param="prompt")
        return list(prompt)

    def check_lengths(self, num_prompt: int, params: SamplingParams) -> None:
        """Raise ``InvalidRequest`` unless the prompt and ``max_tokens`` fit the model's
        context and the KV pool, and its samples fit the running batch (a request that could
        never be scheduled is refused up front, not left waiting forever)."""
        if params.n > self.max_num_seqs:
            raise InvalidRequest(f"n / best_of ({params.n} samples) exceeds the engine's "
                                 f"max_num_seqs ({self.max_num_seqs}): a request's samples run "
                                 "together", param="n")
        if num_prompt >= self.max_model_len:
            raise InvalidRequest(f"prompt has {num_prompt} tokens; the model's context length "
                                 f"is {self.max_model_len}", param="prompt")
        if num_prompt + params.max_tokens > self.max_model_len:
            raise InvalidRequest(f"prompt ({num_prompt} tokens) + max_tokens "
                                 f"({params.max_tokens}) exceeds the model's context length "
                                 f"{self.max_model_len}", param="max_tokens")
        if num_prompt + params.max_tokens > self.kv_capacity_tokens:
            raise InvalidRequest(f"prompt + max_tokens ({num_prompt + params.max_tokens}) "
                                 f"exceeds the KV cache ({self.kv_capacity_tokens} tokens)",
                                 param="max_tokens")
