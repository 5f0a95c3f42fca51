"""Outward types: what the engine returns for a request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ErasureEvent:
    """One erased segment: where it started, what was erased, why, and what replaced it."""

    position: int  # index in the output tokens where the erased segment started
    erased_token_ids: list[int]
    erased_nll: list[float]
    erased_entropy: list[float]
    score: float
    threshold: float
    attempt: int  # 1 for the first erasure of this segment
    replacement_token_ids: list[int] = field(default_factory=list)
    replacement_nll: list[float] = field(default_factory=list)
    replacement_entropy: list[float] = field(default_factory=list)
    replacement_score: float | None = None


@dataclass(slots=True)
class Segment:
    """An accepted segment of the output: token span ``[start, end)``, its score and the
    threshold it was judged against (``None`` when healing was off)."""

    start: int
    end: int
    score: float
    threshold: float | None


@dataclass(slots=True)
class CompletionOutput:
    """One of the ``n`` samples of a request. In streaming deltas, ``text`` and ``token_ids``
    hold only what is new since the previous delta; in final outputs, everything."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    # Per output token: log-prob under the raw model distribution, NLL and entropy under
    # the sampling distribution, and the top-N log-probs when requested.
    logprobs: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] | None = None
    erasures: list[ErasureEvent] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    # Output tokens generated for this sample, erased and restored ones included.
    num_computed_tokens: int = 0
    # (output index, version) from each output position on; more than one entry when the
    # weights were swapped while this sample was generated.
    weight_versions: list[tuple[int, str]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """All samples of one request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_token_logprobs: list[float | None] | None = None
    weight_version: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def merge_delta(acc: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a streaming delta into the accumulated output of its request."""
    if acc is None:
        acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids, [],
                            False, weight_version=delta.weight_version)
    by_index = {o.index: o for o in acc.outputs}
    for d in delta.outputs:
        o = by_index.get(d.index)
        if o is None:
            o = CompletionOutput(d.index, "", [], None,
                                 top_logprobs=[] if d.top_logprobs is not None else None)
            by_index[d.index] = o
            acc.outputs.append(o)
        o.text += d.text
        o.token_ids += d.token_ids
        o.logprobs += d.logprobs
        o.nll += d.nll
        o.entropy += d.entropy
        if d.top_logprobs is not None:
            o.top_logprobs = (o.top_logprobs or []) + d.top_logprobs
        o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason
        o.num_computed_tokens = d.num_computed_tokens
        if d.finish_reason is not None:
            o.erasures, o.segments = d.erasures, d.segments
            o.weight_versions = d.weight_versions
    acc.outputs.sort(key=lambda o: o.index)
    acc.finished = delta.finished
    if delta.finished:
        acc.prompt_logprobs = delta.prompt_logprobs
        acc.prompt_token_logprobs = delta.prompt_token_logprobs
        acc.metrics = delta.metrics
    return acc
