"""vLLM's /tokenize and /detokenize: the exact token ids the server would run for a prompt."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.context import AppContext, ctx_of, owner_of
from server.errors import bad_request
from server.prompt import render
from server.schemas import ChatMessageIn, ToolSpec, refuse_lone_surrogates

router = APIRouter()


class TokenizeRequest(BaseModel):
    """Either `prompt` (text, as /v1/completions tokenises it) or `messages` (through the chat template)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = Field(None, min_length=1)
    tools: list[ToolSpec] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        refuse_lone_surrogates(data)
        return data


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def _ready(ctx: AppContext, model: str | None) -> Any:
    ctx.require_ready()
    ctx.check_model(model)
    return ctx.engine.tokenizer


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request, _: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = ctx_of(request)
    tok = _ready(ctx, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt and messages", param="prompt", code="invalid_value")
    if body.messages is not None:
        try:
            messages = [m.to_message() for m in body.messages]
        except ValueError as exc:
            raise bad_request(str(exc), param="messages", code="invalid_value") from None
        try:
            tools = [t.model_dump(exclude_none=True) for t in body.tools or ()]
            ids = await asyncio.to_thread(render, tok, messages, body.add_generation_prompt, tools)
        except Exception as exc:   # a template that rejects the conversation
            raise bad_request(f"the chat template cannot render these messages: {exc}", param="messages",
                              code="invalid_messages") from None
    else:
        ids = await asyncio.to_thread(tok.encode, body.prompt, add_special_tokens=body.add_special_tokens)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": ctx.engine.max_model_len, "tokens": list(ids),
                           "token_strs": None}
    if body.return_token_strs:
        out["token_strs"] = tok.convert_ids_to_tokens(list(ids))
    return out


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request, _: str = Depends(owner_of)) -> dict[str, str]:
    ctx = ctx_of(request)
    tok = _ready(ctx, body.model)
    vocab = len(tok)
    if any(not 0 <= t < vocab for t in body.tokens):
        raise bad_request(f"tokens must be token ids in [0, {vocab})", param="tokens", code="invalid_value")
    return {"prompt": await asyncio.to_thread(tok.decode, body.tokens)}
