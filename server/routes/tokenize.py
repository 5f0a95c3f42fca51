"""vLLM's tokenizer endpoints, which lm-eval-harness probes to use the server's own tokenizer:
``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from e3rl.engine import InvalidRequest
from e3rl.engine.client import EngineClient

from ..auth import require_api_key
from ..deps import get_engine, get_settings
from ..protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from ..serving import check_model
from ..settings import Settings
from .chat import render_chat

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(req: TokenizeRequest, engine: EngineClient = Depends(get_engine),
                   settings: Settings = Depends(get_settings)) -> TokenizeResponse:
    check_model(req.model, settings.model_name)
    tokenizer = engine.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("give exactly one of prompt or messages", param="prompt")
    if req.messages is not None:
        ids = render_chat(tokenizer, req.messages, req.add_generation_prompt)
    else:
        ids = tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
    strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids,
                            token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(req: DetokenizeRequest, engine: EngineClient = Depends(get_engine),
                     settings: Settings = Depends(get_settings)) -> DetokenizeResponse:
    check_model(req.model, settings.model_name)
    tokenizer = engine.tokenizer
    vocab_size = len(tokenizer)
    for t in req.tokens:
        if not 0 <= t < vocab_size:
            raise InvalidRequest(f"token id {t} is outside the vocabulary [0, {vocab_size})",
                                 param="tokens")
    text = tokenizer.decode(req.tokens, skip_special_tokens=False,
                            clean_up_tokenization_spaces=False)
    return DetokenizeResponse(prompt=text)


@router.get("/tokenizer_info")
async def tokenizer_info(engine: EngineClient = Depends(get_engine)) -> dict:
    """The tokenizer's configuration, as vLLM returns it (special tokens, chat template)."""
    tok = engine.tokenizer
    return {
        "tokenizer_class": type(tok).__name__,
        "eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
        "unk_token": tok.unk_token, "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id, "chat_template": tok.chat_template,
        "model_max_length": engine.max_model_len, "vocab_size": len(tok),
        "add_bos_token": getattr(tok, "add_bos_token", None),
    }
