"""``POST /v1/chat/completions``: messages rendered with the model's chat template."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from e3rl.engine import InvalidRequest, RequestOutput
from e3rl.engine.client import EngineClient

from ..auth import require_api_key
from ..deps import get_engine, get_metrics, get_recorder, get_settings
from ..healing_defaults import HealingDefaults
from ..logprobs import TokenText, chat_logprobs, engine_logprobs
from ..metrics import Metrics
from ..protocol import (AssistantMessage, ChatChoice, ChatCompletionRequest,
                        ChatCompletionResponse, ChatMessage, Usage)
from ..recorder import TrajectoryRecorder
from ..serving import (SSE_DONE, ClientDisconnected, EngineRequest, Generation, SSEResponse,
                       check_model, error_event, fingerprint, new_id, room_after,
                       run_generation, sse)
from ..settings import Settings

router = APIRouter(dependencies=[Depends(require_api_key)])


def render_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> list[int]:
    """The prompt's token ids under the model's chat template (400 if it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("this model has no chat template; use /v1/completions",
                             param="messages")
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)
    except Exception as exc:  # the template refused these messages (e.g. role order)
        raise InvalidRequest(f"the chat template cannot render these messages: {exc}",
                             param="messages") from exc
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _engine_request(req: ChatCompletionRequest, engine: EngineClient, request_id: str,
                    healing_defaults: HealingDefaults, tokenizer) -> EngineRequest:
    """Render, tokenize (on the tokenizer thread) and validate the conversation."""
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    ids = render_chat(tokenizer, req.messages, req.add_generation_prompt,
                      req.continue_final_message)
    max_tokens = req.max_completion_tokens or req.max_tokens or room_after(engine, len(ids))
    params = req.to_sampling_params(n=req.n, max_tokens=max_tokens,
                                    logprobs=engine_logprobs(req.top_logprobs or 0) if req.logprobs
                                    else None, healing_defaults=healing_defaults)
    ids = engine.validate(ids, params)
    return EngineRequest(f"{request_id}-0", ids, ids, params)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(req: ChatCompletionRequest, request: Request,
                                 engine: EngineClient = Depends(get_engine),
                                 metrics: Metrics = Depends(get_metrics),
                                 settings: Settings = Depends(get_settings),
                                 recorder: TrajectoryRecorder | None = Depends(get_recorder)):
    check_model(req.model, settings.model_name)
    req.check_supported(settings.max_n)
    request_id = new_id("chatcmpl")
    engine_request = await engine.run_tokenizer(lambda tokenizer: _engine_request(
        req, engine, request_id, settings.healing_defaults(), tokenizer))
    gen = Generation(engine, metrics, [engine_request], recorder)
    text_of: TokenText = request.app.state.token_text
    try:
        outputs = await run_generation(request, gen, req.stream)
    except ClientDisconnected:
        return Response(status_code=499)  # nobody is listening
    if outputs is None:
        return SSEResponse(_stream(req, gen, request_id, settings.model_name, text_of))
    return _response(req, outputs[0], request_id, settings.model_name, text_of)


def _logprobs(req: ChatCompletionRequest, o, text_of: TokenText):
    if not req.logprobs:
        return None
    return chat_logprobs(text_of, o.token_ids, o.logprobs, o.top_logprobs,
                         req.top_logprobs or 0)


def _response(req: ChatCompletionRequest, result: RequestOutput, request_id: str, model: str,
              text_of: TokenText) -> ChatCompletionResponse:
    choices = [ChatChoice(index=o.index, message=AssistantMessage(content=o.text),
                          logprobs=_logprobs(req, o, text_of), finish_reason=o.finish_reason)
               for o in result.outputs]
    num_prompt = len(result.prompt_token_ids)
    num_generated = sum(len(o.token_ids) for o in result.outputs)
    return ChatCompletionResponse(
        id=request_id, created=int(time.time()), model=model,
        system_fingerprint=fingerprint(result.weight_version), choices=choices,
        usage=Usage(prompt_tokens=num_prompt, completion_tokens=num_generated,
                    total_tokens=num_prompt + num_generated))


async def _stream(req: ChatCompletionRequest, gen: Generation, request_id: str, model: str,
                  text_of: TokenText):
    """SSE chunks, built as plain dicts in the shape of ``ChatCompletionChunk`` (per token,
    pydantic's validation would cost several times more)."""
    head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "system_fingerprint": ""}
    started: set[int] = set()
    num_generated = 0

    def chunk(index: int, delta: dict, logprobs=None, finish_reason=None) -> str:
        body = {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}]}
        if req.include_usage:
            body["usage"] = None
        return sse(json.dumps(body))

    try:
        async for batch in gen.delta_batches():
            events = []
            for _, delta in batch:
                head["system_fingerprint"] = fingerprint(delta.weight_version)
                for o in delta.outputs:
                    if o.index not in started:  # OpenAI opens every choice with its role
                        started.add(o.index)
                        events.append(chunk(o.index, {"role": "assistant", "content": ""}))
                    num_generated += len(o.token_ids)
                    if not o.text and not o.token_ids and o.finish_reason is None:
                        continue
                    logprobs = _logprobs(req, o, text_of)
                    events.append(chunk(o.index, {"content": o.text} if o.text else {},
                                        logprobs.model_dump() if logprobs else None,
                                        o.finish_reason))
            if events:
                yield "".join(events)
        if req.include_usage:
            num_prompt = len(gen.requests[0].prompt_ids)
            usage = Usage(prompt_tokens=num_prompt, completion_tokens=num_generated,
                          total_tokens=num_prompt + num_generated)
            yield sse(json.dumps({**head, "choices": [], "usage": usage.model_dump()}))
    except Exception as exc:  # after the headers: the error goes into the stream
        yield error_event(exc, gen.metrics)
    finally:
        gen.close()
    yield SSE_DONE
