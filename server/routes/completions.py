"""``POST /v1/completions``: OpenAI's legacy completions, streaming or not."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from e3rl.engine import InvalidRequest, RequestOutput
from e3rl.engine.client import EngineClient

from ..auth import require_api_key
from ..deps import get_engine, get_metrics, get_recorder, get_settings
from ..logprobs import (TokenText, completion_logprobs, engine_logprobs,
                        merge_completion_logprobs)
from ..metrics import Metrics
from ..protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from ..recorder import TrajectoryRecorder
from ..serving import (SSE_DONE, ClientDisconnected, EngineRequest, Generation, SSEResponse,
                       check_model, error_event, fingerprint, healing_extension, new_id,
                       room_after, run_generation, sse)
from ..settings import Settings

router = APIRouter(dependencies=[Depends(require_api_key)])


def _prompts(req: CompletionRequest) -> list[str | list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _check(req: CompletionRequest, settings: Settings) -> None:
    check_model(req.model, settings.model_name)
    req.check_supported(settings.max_n)
    if req.suffix is not None:
        raise InvalidRequest("suffix is not supported", param="suffix")
    if req.best_of is not None:
        if req.best_of < req.n:
            raise InvalidRequest("best_of must be >= n", param="best_of")
        if req.best_of > settings.max_n:
            raise InvalidRequest(f"best_of must be <= {settings.max_n}", param="best_of")
        if req.stream and req.best_of > req.n:
            raise InvalidRequest("best_of > n cannot be streamed", param="best_of")
    if req.stream and req.echo and req.logprobs is not None:
        raise InvalidRequest("echo with logprobs cannot be streamed", param="echo")
    num_prompts = len(_prompts(req))
    if num_prompts > settings.max_waiting:  # could never be queued at once: not a 503
        raise InvalidRequest(f"{num_prompts} prompts in one request, but the server queues at "
                             f"most {settings.max_waiting} (--max-waiting)", param="prompt")


def _engine_requests(req: CompletionRequest, engine: EngineClient, request_id: str,
                     settings: Settings, tokenizer) -> list[EngineRequest]:
    """Tokenize (once, on the tokenizer thread) and validate every prompt before anything
    is submitted."""
    out = []
    for i, prompt in enumerate(_prompts(req)):
        if isinstance(prompt, list) and not prompt:
            raise InvalidRequest("a token-id prompt must not be empty", param="prompt")
        ids = tokenizer(prompt)["input_ids"] if isinstance(prompt, str) and prompt else prompt
        max_tokens = req.max_tokens if req.max_tokens is not None \
            else room_after(engine, len(ids))
        # Scoring the prompt (echo with logprobs, or max_tokens 0) needs its log-probs.
        prompt_logprobs = None
        if req.echo and req.logprobs is not None:
            prompt_logprobs = req.logprobs
        elif max_tokens == 0:
            prompt_logprobs = 0
        params = req.to_sampling_params(n=req.best_of or req.n, max_tokens=max_tokens,
                                        logprobs=engine_logprobs(req.logprobs),
                                        prompt_logprobs=prompt_logprobs,
                                        healing_defaults=settings.healing_defaults())
        ids = engine.validate(ids if isinstance(prompt, str) and prompt else prompt, params)
        out.append(EngineRequest(f"{request_id}-{i}", prompt, ids, params))
    return out


@router.post("/v1/completions", response_model=CompletionResponse)
async def create_completion(req: CompletionRequest, request: Request,
                            engine: EngineClient = Depends(get_engine),
                            metrics: Metrics = Depends(get_metrics),
                            settings: Settings = Depends(get_settings),
                            recorder: TrajectoryRecorder | None = Depends(get_recorder)):
    _check(req, settings)
    request_id = new_id("cmpl")
    requests = await engine.run_tokenizer(
        lambda tokenizer: _engine_requests(req, engine, request_id, settings, tokenizer))
    gen = Generation(engine, metrics, requests, recorder)
    text_of: TokenText = request.app.state.token_text
    try:
        outputs = await run_generation(request, gen, req.stream)
    except ClientDisconnected:
        return Response(status_code=499)  # nobody is listening
    if outputs is None:
        return SSEResponse(_stream(req, gen, request_id, settings.model_name, text_of))
    return _response(req, gen, outputs, request_id, settings.model_name, text_of)


def _prompt_text(r: EngineRequest, text_of: TokenText) -> str:
    if isinstance(r.prompt, str):
        return r.prompt
    return text_of.tokenizer.decode(r.prompt_ids, skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)


def _response(req: CompletionRequest, gen: Generation, outputs: list[RequestOutput],
              request_id: str, model: str, text_of: TokenText) -> CompletionResponse:
    choices = []
    num_generated = 0
    for i, (r, result) in enumerate(zip(gen.requests, outputs)):
        samples = result.outputs
        num_generated += sum(len(o.token_ids) for o in samples)
        if len(samples) > req.n:  # best_of: keep the n most likely samples
            samples = sorted(samples, key=lambda o: -sum(o.logprobs))[:req.n]
        prompt_text = _prompt_text(r, text_of) if req.echo else ""
        for j, o in enumerate(samples):
            logprobs = None
            if req.logprobs is not None:
                logprobs = completion_logprobs(text_of, o.token_ids, o.logprobs, o.top_logprobs,
                                               req.logprobs, first_offset=len(prompt_text))
                if req.echo:
                    prompt_lp = completion_logprobs(
                        text_of, result.prompt_token_ids, result.prompt_token_logprobs or [],
                        result.prompt_logprobs, req.logprobs)
                    logprobs = merge_completion_logprobs(prompt_lp, logprobs)
            extension = {"e3rl": healing_extension(o)} if r.params.heals else {}
            choices.append(CompletionChoice(index=i * req.n + j, text=prompt_text + o.text,
                                            logprobs=logprobs, finish_reason=o.finish_reason,
                                            **extension))
    num_prompt = sum(len(r.prompt_ids) for r in gen.requests)
    usage = Usage(prompt_tokens=num_prompt, completion_tokens=num_generated,
                  total_tokens=num_prompt + num_generated)
    if any(r.params.heals for r in gen.requests):
        usage.computed_tokens = sum(o.num_computed_tokens for result in outputs
                                    for o in result.outputs)
    version = outputs[0].weight_version if outputs else ""
    return CompletionResponse(
        id=request_id, created=int(time.time()), model=model,
        system_fingerprint=fingerprint(version), choices=choices, usage=usage)


async def _stream(req: CompletionRequest, gen: Generation, request_id: str, model: str,
                  text_of: TokenText):
    """SSE chunks. Built as plain dicts (the shape of ``CompletionResponse``): this runs once
    per token, where pydantic's validation would cost several times more."""
    head = {"id": request_id, "object": "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": ""}
    echoed: set[int] = set()
    num_generated = num_computed = 0
    try:
        async for batch in gen.delta_batches():
            events = []
            for i, delta in batch:
                head["system_fingerprint"] = fingerprint(delta.weight_version)
                for o in delta.outputs:
                    index = i * req.n + o.index
                    text = o.text
                    if req.echo and index not in echoed:
                        echoed.add(index)
                        text = _prompt_text(gen.requests[i], text_of) + text
                    num_generated += len(o.token_ids)
                    if not text and not o.token_ids and o.finish_reason is None:
                        continue
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = completion_logprobs(text_of, o.token_ids, o.logprobs,
                                                       o.top_logprobs, req.logprobs).model_dump()
                    choice = {"index": index, "text": text, "logprobs": logprobs,
                              "finish_reason": o.finish_reason}
                    if o.finish_reason is not None:
                        num_computed += o.num_computed_tokens
                        if gen.requests[i].params.heals:
                            choice["e3rl"] = healing_extension(o)
                    chunk = {**head, "choices": [choice]}
                    if req.include_usage:
                        chunk["usage"] = None
                    events.append(sse(json.dumps(chunk)))
            if events:
                yield "".join(events)
        if req.include_usage:
            num_prompt = sum(len(r.prompt_ids) for r in gen.requests)
            usage = Usage(prompt_tokens=num_prompt, completion_tokens=num_generated,
                          total_tokens=num_prompt + num_generated)
            if any(r.params.heals for r in gen.requests):
                usage.computed_tokens = num_computed
            yield sse(json.dumps({**head, "choices": [], "usage": usage.model_dump()}))
    except Exception as exc:  # after the headers: the error goes into the stream
        yield error_event(exc, gen.metrics)
    finally:
        gen.close()
    yield SSE_DONE
