"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from server.context import AppContext, ctx_of, owner_of
from server.engine.base import EngineError
from server.errors import APIError, bad_request
from server.generation import Turn
from server.logprobs import TokenText, chat_logprobs, completion_logprobs
from server.prompt import TurnTokens, build_text_turn
from server.routes.turns import (TurnStream, chat_plan, chat_tools, drain, error_event, merged, prepare, refuse_surely_too_long,
                                 resolve_session, session_headers, sse, until_disconnect, with_session_header)
from server.schemas import ChatCompletionRequest, CompletionRequest
from server.sessions import SessionTurn

router = APIRouter()


# --- chat -----------------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, owner: str = Depends(owner_of)) -> Response:
    ctx = ctx_of(request)
    ctx.require_ready()
    model = ctx.check_model(body.model)
    sid = resolve_session(request, body)
    return await with_session_header(sid, _chat(ctx, request, owner, body, model, sid))


async def _chat(ctx: AppContext, request: Request, owner: str, body: ChatCompletionRequest, model: str,
                sid: str | None) -> Response:
    try:
        messages = [m.to_message() for m in body.messages]
    except ValueError as exc:
        raise bad_request(str(exc), param="messages", code="invalid_value") from None
    await refuse_surely_too_long(ctx, sum(len(m.content.encode()) for m in messages),
                                  "messages")
    tools, tool_use = chat_tools(ctx, body)
    plan = chat_plan(ctx, messages, tools)
    requested = body.max_completion_tokens or body.max_tokens
    turns = await prepare(ctx, owner, body, sid, "chat", plan, requested, ctx.settings.default_max_tokens, "messages",
                           tool_use=tool_use)
    return await _reply(ctx, request, turns, body, model, sid, chat=True)


def _message(turn: Turn) -> dict[str, Any]:
    content, calls = turn.reply()
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [c.openai() for c in calls]
    return message


def _usage(turns: list[Turn]) -> dict[str, int]:
    """OpenAI counts the prompt once and the completion tokens of every choice."""
    prompt = turns[0].final.prompt_tokens if turns[0].final else len(turns[0].tokens.token_ids)
    completion = sum(t.final.completion_tokens for t in turns if t.final is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _reply(ctx: AppContext, request: Request, turns: list[Turn], body: Any, model: str, sid: str | None, *,
                 chat: bool) -> Response:
    """Stream the turn as SSE, or wait for it (a disconnect aborts it) and answer one JSON object."""
    headers = session_headers(sid)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        events = _chat_events if chat else _completion_events
        return TurnStream(events(ctx, turns, model, include_usage, body.return_token_ids), turns, headers)
    if await until_disconnect(request, drain(ctx, turns)) is None:
        return Response(status_code=499)
    text = TokenText(ctx.engine.tokenizer) if turns[0].sampling.logprobs is not None else None
    choices = []
    for turn in turns:
        assert turn.final is not None
        content = {"message": _message(turn)} if chat else {"text": turn.text}
        logprobs = None
        if text is not None:
            logprobs = chat_logprobs(turn.logprobs, text) if chat else completion_logprobs(turn.logprobs, text)
        choice: dict[str, Any] = {"index": turn.index, **content, "logprobs": logprobs,
                                  "finish_reason": turn.finish_reason}
        if body.return_token_ids:
            choice["token_ids"] = turn.token_ids
        choices.append(choice)
    first = turns[0]
    resp: dict[str, Any] = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{first.request_id}",
                            "object": "chat.completion" if chat else "text_completion", "created": first.created,
                            "model": model, "system_fingerprint": None, "choices": choices, "usage": _usage(turns),
                            "delta_mem": first.delta_mem_info()}
    if body.return_token_ids:
        resp["prompt_token_ids"] = first.tokens.token_ids
    return JSONResponse(resp, headers=headers)


async def _chat_events(ctx: AppContext, turns: list[Turn], model: str, include_usage: bool,
                       return_token_ids: bool) -> AsyncIterator[str]:
    first = turns[0]
    base = {"id": f"chatcmpl-{first.request_id}", "object": "chat.completion.chunk", "created": first.created,
            "model": model, "system_fingerprint": None}
    text = TokenText(ctx.engine.tokenizer) if first.sampling.logprobs is not None else None

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, top: dict[str, Any] | None = None,
              logprobs: Any = None, **extra: Any) -> str:
        obj: dict[str, Any] = {**base, **(top or {}), "choices": [{"index": index, "delta": delta,
                                                                  "logprobs": logprobs, "finish_reason": finish,
                                                                  **extra}]}
        if include_usage:
            obj["usage"] = None
        return sse(obj)

    # with tools, the reply is read as it streams: content up to a call, then the calls' deltas
    for turn in turns:
        turn.stream_tools()
    try:
        top = {"prompt_token_ids": first.tokens.token_ids} if return_token_ids else None
        started: set[int] = set()
        async for turn, out in merged(ctx, turns):
            if turn.index not in started:   # with its first token, as vLLM sends it: never before the prefill
                started.add(turn.index)
                yield chunk(turn.index, {"role": "assistant", "content": ""}, top=top)
            extra = {"token_ids": out.token_ids} if return_token_ids else {}
            logprobs = chat_logprobs(out.logprobs, text) if text is not None and out.logprobs else None
            shown, calls = out.text, []
            if turn.tool_use is not None:
                step = turn.take_steps()
                shown, calls = step.content, [d.openai() for d in step.calls]
            if shown or extra or logprobs:
                yield chunk(turn.index, {"content": shown} if shown else {}, logprobs=logprobs, **extra)
            if calls:
                yield chunk(turn.index, {"tool_calls": calls})
            if out.finished:
                yield chunk(turn.index, {}, turn.finish_reason, top={"delta_mem": turn.delta_mem_info()})
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage(turns)})
    except (APIError, EngineError) as exc:
        yield error_event(exc)
    yield "data: [DONE]\n\n"


# --- completions ----------------------------------------------------------------------------------
def _prompt_ids(ctx: AppContext, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = ctx.engine.tokenizer.encode(prompt, add_special_tokens=True) if prompt else []
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        vocab = len(ctx.engine.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
        ids = list(prompt)
    else:
        raise bad_request("batched prompts are not supported: send one prompt per request", param="prompt",
                          code="invalid_value")
    if not ids:
        raise bad_request("prompt must not be empty", param="prompt", code="invalid_value")
    return ids


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, owner: str = Depends(owner_of)) -> Response:
    ctx = ctx_of(request)
    ctx.require_ready()
    model = ctx.check_model(body.model)
    sid = resolve_session(request, body)
    return await with_session_header(sid, _complete(ctx, request, owner, body, model, sid))


async def _complete(ctx: AppContext, request: Request, owner: str, body: CompletionRequest, model: str,
                    sid: str | None) -> Response:
    if isinstance(body.prompt, str):
        await refuse_surely_too_long(ctx, len(body.prompt.encode()), "prompt")
    ids = await asyncio.to_thread(_prompt_ids, ctx, body.prompt)

    def plan(session: SessionTurn | None) -> TurnTokens:
        gran = ctx.engine.write_granularity
        return session.plan_text(ids, gran) if session else build_text_turn(ids, granularity=gran)

    # OpenAI's default for legacy completions is 16 tokens
    turns = await prepare(ctx, owner, body, sid, "completion", plan, body.max_tokens, 16, "prompt")
    return await _reply(ctx, request, turns, body, model, sid, chat=False)


async def _completion_events(ctx: AppContext, turns: list[Turn], model: str, include_usage: bool,
                             return_token_ids: bool) -> AsyncIterator[str]:
    first = turns[0]
    base = {"id": f"cmpl-{first.request_id}", "object": "text_completion", "created": first.created, "model": model,
            "system_fingerprint": None}
    text = TokenText(ctx.engine.tokenizer) if first.sampling.logprobs is not None else None
    offsets = [0] * len(turns)
    try:
        async for turn, out in merged(ctx, turns):
            logprobs = None
            if text is not None and out.logprobs:
                logprobs = completion_logprobs(out.logprobs, text, offsets[turn.index])
                offsets[turn.index] += sum(len(t) for t in logprobs["tokens"])
            choice: dict[str, Any] = {"index": turn.index, "text": out.text, "logprobs": logprobs,
                                      "finish_reason": out.finish_reason if out.finished else None}
            if return_token_ids:
                choice["token_ids"] = out.token_ids
            obj: dict[str, Any] = {**base, "choices": [choice]}
            if include_usage:
                obj["usage"] = None
            if out.finished:
                obj["delta_mem"] = turn.delta_mem_info()
            if out.text or out.finished or return_token_ids or logprobs:
                yield sse(obj)
        if include_usage:
            yield sse({**base, "choices": [], "usage": _usage(turns)})
    except (APIError, EngineError) as exc:
        yield error_event(exc)
    yield "data: [DONE]\n\n"


# --- models ---------------------------------------------------------------------------------------
def _model_object(ctx: AppContext) -> dict[str, Any]:
    eng = ctx.engine
    return {"id": eng.model_name, "object": "model", "created": int(ctx.started_at), "owned_by": "delta-mem-vllm",
            "max_model_len": eng.max_model_len,
            "delta_mem": {"adapter_fingerprint": eng.adapter_fingerprint, "state_shape": list(eng.state_shape)}}


@router.get("/v1/models")
async def list_models(request: Request, _: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = ctx_of(request)
    ctx.require_ready()
    return {"object": "list", "data": [_model_object(ctx)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, _: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = ctx_of(request)
    ctx.require_ready()
    ctx.check_model(model_id)
    return _model_object(ctx)
