"""OpenAI-compatible request, response, stream-chunk and error models.

Requests are strict: wrong types are refused rather than coerced (``"max_tokens": "16"`` is a
400, as is ``true`` for a number), and unknown fields are refused by name, so a typo never
silently changes what runs. The engine's extras follow vLLM's names (``top_k``, ``min_p``,
``stop_token_ids``, ``ignore_eos``, ...).
"""

from __future__ import annotations

import re
from typing import Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      StrictStr, field_validator)

from e3rl.engine import InvalidRequest, SamplingParams
from e3rl.engine.healer import HealingParams

from .healing_defaults import HealingDefaults

MAX_LOGPROBS = 20  # the engine's limit on top-N log-probs
# Prompts in one completion request. Each is tokenized and validated before any runs, so a
# body of a million one-character prompts (4 MiB) would hold the event loop for minutes.
MAX_PROMPTS = 1024
# Stop conditions of one request: the engine tests every one of them after every token, so a
# body of 100,000 of them would slow every running request, not just this one.
MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS = 64, 1024

TokenIds = list[StrictInt]
# A string, a batch of strings, token ids, or a batch of token-id lists (OpenAI's four forms).
Prompt = Union[StrictStr, list[StrictStr], TokenIds, list[TokenIds]]


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(value: Any) -> bool:
    """Whether ``value`` (a string, or lists, dicts and models of them) holds a lone UTF-16
    surrogate: JSON's ``\\ud800`` escape decodes to one, and no UTF-8 encoder (the
    tokenizer's, SQLite's, the log's) takes it."""
    if isinstance(value, str):
        return not value.isascii() and _LONE_SURROGATE.search(value) is not None
    if isinstance(value, (list, tuple)):
        return any(has_lone_surrogate(v) for v in value if not isinstance(v, (int, float)))
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, BaseModel):
        return has_lone_surrogate(value.__dict__) or has_lone_surrogate(value.model_extra or {})
    return False


class Utf8Fields(BaseModel):
    """A request body whose strings can all be encoded as UTF-8: a lone surrogate is a 400
    naming the field (it used to reach the tokenizer and fail there with a 500)."""

    @field_validator("*")
    @classmethod
    def _utf8(cls, value: Any) -> Any:
        if has_lone_surrogate(value):
            raise ValueError("must be valid Unicode (a lone surrogate such as \\ud800 cannot "
                             "be encoded as UTF-8)")
        return value


class _Strict(Utf8Fields):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False


class HealingOptions(BaseModel):
    """Self-healing options of one request (``e3rl.engine.healer.HealingParams``: ``enabled``,
    ``score``, ``quantile``, ``threshold``, ``kappa``, ``combine``, ``segment_boundary``,
    ``max_erasures``, ``max_retries_per_segment``, ...). They override the server's defaults;
    an object without ``enabled`` turns healing on."""

    model_config = ConfigDict(extra="allow")
    enabled: StrictBool = True


class SamplingFields(_Strict):
    """The sampling options that completions and chat completions share."""

    model: StrictStr | None = None
    temperature: StrictFloat | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | None = Field(None, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    frequency_penalty: StrictFloat | None = Field(None, ge=-2, le=2)
    logit_bias: dict[StrictStr, StrictFloat] | None = None
    user: StrictStr | None = None
    # Engine extras, named as in vLLM.
    top_k: StrictInt | None = Field(None, ge=-1)
    min_p: StrictFloat | None = Field(None, ge=0, le=1)
    min_tokens: StrictInt = Field(0, ge=0)
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    healing: HealingOptions | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_max_stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings (got {len(stop)})")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _at_most_max_stop_token_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids (got {len(ids)})")
        return ids

    def check_supported(self, max_n: int) -> None:
        """Refuse, naming the field, what the engine does not implement (yet)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequest(f"{name} is not supported (only 0)", param=name)
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported", param="logit_bias")
        if self.n > max_n:
            raise InvalidRequest(f"n must be <= {max_n}", param="n")

    def healing_params(self, defaults: dict) -> HealingParams | None:
        """The server's healing defaults overridden by this request's ``healing`` object."""
        options = dict(defaults)
        if self.healing is not None:
            options.update(self.healing.model_extra or {})
            options["enabled"] = self.healing.enabled
        if not options.get("enabled", False):
            return None
        return HealingParams.from_dict(options)

    def to_sampling_params(self, *, n: int, max_tokens: int, logprobs: int | None,
                           prompt_logprobs: int | None = None,
                           healing_defaults: HealingDefaults | None = None) -> SamplingParams:
        """The engine's parameters (raises ``InvalidRequest`` naming the field). The server's
        healing defaults depend on the temperature (a calibrated default skips greedy)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        defaults = healing_defaults.options_for(temperature) if healing_defaults else {}
        return SamplingParams(
            healing=self.healing_params(defaults),
            n=n, temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p, seed=self.seed,
            max_tokens=max_tokens, min_tokens=self.min_tokens,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``."""

    prompt: Prompt
    suffix: StrictStr | None = None
    max_tokens: StrictInt | None = Field(16, ge=0)
    best_of: StrictInt | None = Field(None, ge=1)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _at_most_max_prompts(cls, prompt: Prompt) -> Prompt:
        is_batch = isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], int)
        if is_batch and len(prompt) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request (got {len(prompt)})")
        return prompt


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False


# -- responses ---------------------------------------------------------------------------
class Usage(BaseModel):
    """OpenAI's usage. With self-healing on, an extension ``computed_tokens`` (tokens
    generated, erased ones included) follows; OpenAI clients ignore it."""

    model_config = ConfigDict(extra="allow")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    """OpenAI's choice. With self-healing on, an extension ``e3rl`` follows (erasure count
    and events, returned and computed tokens); OpenAI clients ignore it."""

    model_config = ConfigDict(extra="allow")
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class HealingDefaultInfo(BaseModel):
    """Whether a request that sends no ``healing`` object heals, and why."""

    default: Literal["on", "off"]
    source: Literal["calibration", "--healing", "none"]  # e3rl_healing.json, the flag, neither
    applies_to: Literal["sampled requests (temperature > 0)", "all requests"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "e3rl"
    max_model_len: int
    weight_version: str  # the version of the weights being served (POST /v1/admin/weights)
    healing: HealingDefaultInfo  # the server's self-healing default


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- tokenizer endpoints (vLLM's shapes, which lm-eval-harness uses) -----------------------
class TokenizeRequest(_Strict):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: StrictStr | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


# -- admin ---------------------------------------------------------------------------------
MAX_VERSION_LENGTH = 128  # of a weight version, however the weights arrive


class WeightUpdateRequest(_Strict):
    """A checkpoint directory (inside --checkpoint-dir) and the version it becomes."""

    path: StrictStr = Field(min_length=1)
    version: StrictStr = Field(min_length=1, max_length=MAX_VERSION_LENGTH)


class WeightVersionResponse(BaseModel):
    """``GET /v1/admin/weights``: the version being served (the trainer's view of a replica,
    on the admin port where the API routes are not served)."""

    object: Literal["weight_version"] = "weight_version"
    model: str
    version: str
    updating: bool  # a weight update is running right now


class WeightUpdateResponse(BaseModel):
    """The answer of a weight swap, from a directory (``POST /v1/admin/weights``) or an
    uploaded file (``POST /v1/admin/weights/upload``)."""

    object: Literal["weight_update"] = "weight_update"
    version: str
    previous_version: str
    source: Literal["path", "upload"]
    path: str | None  # the resolved checkpoint directory; None for an upload
    num_tensors: int
    num_bytes: int | None = None  # the uploaded file's size; None for a directory
    receive_s: float | None = None  # receiving the upload into a temporary file
    load_s: float  # reading and validating the checkpoint (off the engine thread)
    swap_s: float  # the engine paused between two steps to copy the tensors


# -- errors ------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, type_: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param,
                                         code=code)).model_dump()
