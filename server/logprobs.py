"""Log-probs in OpenAI's two shapes: the completions shape (parallel lists ``tokens`` /
``token_logprobs`` / ``top_logprobs`` / ``text_offset``) and the chat shape (one object per
token). Token strings come from the front end's tokenizer, one token decoded at a time."""

from __future__ import annotations

from .protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def engine_logprobs(num_top: int | None) -> int | None:
    """How many top log-probs to ask the engine for. At least 1: the engine's sampler fails
    on ``logprobs=0`` (its top-k tensors are skipped), so 0 is served by trimming 1."""
    return None if num_top is None else max(1, num_top)


def trim_top(top: dict[int, float] | None, token_id: int, num_top: int) -> dict[int, float] | None:
    """The sampled token and the ``num_top`` likeliest alternatives."""
    if top is None:
        return None
    best = sorted(top.items(), key=lambda kv: -kv[1])[:num_top]
    out = {token_id: top[token_id]} if token_id in top else {}
    out.update(best)
    return out


class TokenText:
    """Token id -> its text, cached (the vocabulary never changes while serving)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
            self._cache[token_id] = text
        return text

    def top(self, top: dict[int, float] | None) -> dict[str, float] | None:
        if top is None:
            return None
        out: dict[str, float] = {}
        for token_id, logprob in top.items():
            out.setdefault(self(token_id), logprob)  # two ids with one text: keep the first
        return out


def completion_logprobs(text_of: TokenText, token_ids: list[int],
                        token_logprobs: list[float | None],
                        top_logprobs: list[dict[int, float] | None] | None, num_top: int,
                        first_offset: int = 0) -> CompletionLogprobs:
    """The completions shape for ``token_ids``: each token's log-prob and a dict of the token
    and its ``num_top`` likeliest alternatives; offsets count characters from
    ``first_offset``."""
    tokens = [text_of(t) for t in token_ids]
    offsets, pos = [], first_offset
    for token in tokens:
        offsets.append(pos)
        pos += len(token)
    tops = [trim_top(top, t, num_top) for t, top in
            zip(token_ids, top_logprobs or [None] * len(token_ids))]
    return CompletionLogprobs(tokens=tokens, token_logprobs=list(token_logprobs),
                              top_logprobs=[text_of.top(t) for t in tops], text_offset=offsets)


def merge_completion_logprobs(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens,
                              token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs,
                              text_offset=a.text_offset + b.text_offset)


def _top(text_of: TokenText, token_id: int, logprob: float) -> TopLogprob:
    text = text_of(token_id)
    return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))


def chat_logprobs(text_of: TokenText, token_ids: list[int], logprobs: list[float],
                  top_logprobs: list[dict[int, float]] | None, num_top: int) -> ChatLogprobs:
    """The chat shape: each token with its log-prob and its ``num_top`` best alternatives."""
    content = []
    for j, token_id in enumerate(token_ids):
        entry = _top(text_of, token_id, logprobs[j])
        tops = []
        if top_logprobs is not None and num_top:
            ranked = sorted(top_logprobs[j].items(), key=lambda kv: -kv[1])[:num_top]
            tops = [_top(text_of, t, lp) for t, lp in ranked]
        content.append(TokenLogprob(**entry.model_dump(), top_logprobs=tops))
    return ChatLogprobs(content=content)
