"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from server.context import AppContext, ctx_of, owner_of
from server.engine.base import EngineError, RequestRejected
from server.errors import APIError, bad_request
from server.generation import (
    Turn,
    decide_max_tokens,
    resolve_session_id,
    run_turn,
    sampling_from,
)
from server.logprobs import TokenText, chat_logprobs, completion_logprobs
from server.prompt import TurnTokens, build_chat_turn, build_text_turn
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DeltaMemOptions,
    _GenerationBody,
)
from server.sessions import SessionTurn, check_session_id
from server.tools import ToolUse

router = APIRouter()
T = TypeVar("T")


# --- shared pieces --------------------------------------------------------------------------------
def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _error_event(exc: BaseException) -> str:
    return _sse((exc if isinstance(exc, APIError) else _engine_error(exc)).body())


async def _refuse_surely_too_long(ctx: AppContext, text_bytes: int, param: str) -> None:
    """400 before tokenising when the text cannot fit: no token covers more than the vocabulary's
    longest token, so the prompt has at least text_bytes / longest tokens."""
    longest = await ctx.longest_token_bytes()
    at_least = text_bytes // max(1, longest)
    if at_least > ctx.engine.max_model_len:
        raise APIError(400, f"this model's maximum context length is {ctx.engine.max_model_len} tokens; the "
                            f"{param} has at least {at_least} tokens ({text_bytes} bytes of text). Shorten the {param}.",
                       param=param, code="context_length_exceeded")


async def _prepare(ctx: AppContext, owner: str, body: _GenerationBody, session_id: str | None, kind: str,
                   plan: Callable[[SessionTurn | None], TurnTokens], requested: int | None,
                   default: int | None, prompt_param: str, tool_use: ToolUse | None = None) -> list[Turn]:
    """Lock/load the session (if any), build the tokens, size the completion; one turn per choice.
    Errors here are plain HTTP errors (nothing has streamed yet) and leave the session untouched."""
    opts = body.delta_mem or DeltaMemOptions()
    n = body.n or 1
    if n > 1 and session_id is not None and opts.write:
        raise bad_request("n > 1 needs a stateless or read-only request (delta_mem.write=false): n continuations "
                          "cannot all be committed to one session", param="n", code="invalid_value")
    session = None
    if session_id is not None:
        try:
            session = await ctx.sessions.begin_turn(owner, session_id, reset=opts.reset, write=opts.write)
        except APIError as exc:
            if exc.code == "session_busy":
                ctx.metrics.session_busy.inc()
            raise
    try:
        tokens = await asyncio.to_thread(plan, session)   # rendering and tokenising: off the event loop
        engine = ctx.engine
        max_tokens = decide_max_tokens(requested, default, len(tokens.token_ids), engine.max_model_len,
                                       prompt_param)
        sampling = sampling_from(body, max_tokens, len(engine.tokenizer))
        return Turn(kind=kind, tokens=tokens, sampling=sampling, write=opts.write, session=session,
                    tool_use=tool_use).branches(n)
    except BaseException:
        if session is not None:
            session.release()
        raise


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`, cancelling it if the client goes away (a non-streamed turn then commits nothing)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done() and (watcher.done() or asyncio.current_task().cancelling()):  # type: ignore[union-attr]
            task.cancel()
        watcher.cancel()
    if not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


async def _drain(ctx: AppContext, turns: list[Turn]) -> list[Turn]:
    try:
        async for _ in _merged(ctx, turns):
            pass
    except EngineError as exc:
        raise _engine_error(exc) from exc
    return turns


async def _merged(ctx: AppContext, turns: list[Turn]) -> AsyncIterator[tuple[Turn, Any]]:
    """The engine outputs of all branches as they come; a failure in one stops them all."""
    if len(turns) == 1:
        async for out in run_turn(ctx, turns[0]):
            yield turns[0], out
        return
    queue: asyncio.Queue[tuple[Turn, Any] | BaseException | None] = asyncio.Queue()

    async def pump(turn: Turn) -> None:
        try:
            async for out in run_turn(ctx, turn):
                await queue.put((turn, out))
            await queue.put(None)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(t)) for t in turns]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for turn in turns:
            turn.release()


def _engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, RequestRejected):
        return bad_request(str(exc), param=exc.param, code="invalid_value")
    return APIError(500, f"generation failed: {exc}", type="server_error", code="engine_error")


class _TurnStream(StreamingResponse):
    """A streamed turn that always releases its session and closes its generator, even when the
    client disconnects before the body starts (the generator would then never run its finally)."""

    def __init__(self, content: AsyncIterator[str], turns: list[Turn], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        self._turns = turns

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(BaseException):
                await self.body_iterator.aclose()  # type: ignore[union-attr]
            for turn in self._turns:
                turn.release()


def _session_headers(session_id: str | None) -> dict[str, str]:
    return {"X-Session-ID": session_id} if session_id else {}


async def _with_session_header(session_id: str | None, work: Awaitable[Response]) -> Response:
    try:
        return await work
    except APIError as exc:
        if session_id:
            exc.headers = {**(exc.headers or {}), "X-Session-ID": session_id}
        raise


def _resolve(request: Request, body: _GenerationBody) -> str | None:
    sid = resolve_session_id(body.session_id, request.headers.get("x-session-id"))
    return check_session_id(sid) if sid is not None else None


# --- chat -----------------------------------------------------------------------------------------
@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, owner: str = Depends(owner_of)) -> Response:
    ctx = ctx_of(request)
    ctx.require_ready()
    model = ctx.check_model(body.model)
    sid = _resolve(request, body)
    return await _with_session_header(sid, _chat(ctx, request, owner, body, model, sid))


async def _chat(ctx: AppContext, request: Request, owner: str, body: ChatCompletionRequest, model: str,
                sid: str | None) -> Response:
    try:
        messages = [m.to_message() for m in body.messages]
    except ValueError as exc:
        raise bad_request(str(exc), param="messages", code="invalid_value") from None
    await _refuse_surely_too_long(ctx, sum(len(m.content.encode()) for m in messages),
                                  "messages")
    tok, gran, tools = ctx.engine.tokenizer, ctx.engine.write_granularity, body.tool_dicts()
    tool_use = None
    if tools:
        if gran != "token":
            raise bad_request(f"tools are not supported with a {gran} adapter (segment ids do not cover the "
                              "template's tool block)", param="tools", code="invalid_value")
        tool_use = ToolUse(body.choice(), ctx.tool_parser(), parallel=body.parallel_tool_calls is not False)

    def plan(session: SessionTurn | None) -> TurnTokens:
        try:
            return (session.plan_chat(tok, messages, gran, tools) if session
                    else build_chat_turn(tok, messages, 0, granularity=gran, tools=tools))
        except Exception as exc:  # a template that rejects the conversation (e.g. role order)
            raise bad_request(f"the chat template cannot render these messages: {exc}", param="messages",
                              code="invalid_messages") from None

    requested = body.max_completion_tokens or body.max_tokens
    turns = await _prepare(ctx, owner, body, sid, "chat", plan, requested, ctx.settings.default_max_tokens, "messages",
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
    headers = _session_headers(sid)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        events = _chat_events if chat else _completion_events
        return _TurnStream(events(ctx, turns, model, include_usage, body.return_token_ids), turns, headers)
    if await _until_disconnect(request, _drain(ctx, turns)) is None:
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
        return _sse(obj)

    # with tools, content passes a gate that stops at a tool call's start; the calls follow at the end
    gates = {t.index: t.tool_use.gate() if t.tool_use else None for t in turns}
    try:
        top = {"prompt_token_ids": first.tokens.token_ids} if return_token_ids else None
        for turn in turns:
            yield chunk(turn.index, {"role": "assistant", "content": ""}, top=top)
        async for turn, out in _merged(ctx, turns):
            extra = {"token_ids": out.token_ids} if return_token_ids else {}
            logprobs = chat_logprobs(out.logprobs, text) if text is not None and out.logprobs else None
            shown = out.text
            if turn.tool_use is not None:
                gate = gates[turn.index]
                shown = "" if gate is None else gate.feed(out.text) + (gate.flush() if out.finished else "")
            if shown or extra or logprobs:
                yield chunk(turn.index, {"content": shown} if shown else {}, logprobs=logprobs, **extra)
            if out.finished:
                calls = turn.reply()[1]
                for i, call in enumerate(calls):
                    yield chunk(turn.index, {"tool_calls": [call.openai(index=i)]})
                yield chunk(turn.index, {}, turn.finish_reason, top={"delta_mem": turn.delta_mem_info()})
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(turns)})
    except (APIError, EngineError) as exc:
        yield _error_event(exc)
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
    sid = _resolve(request, body)
    return await _with_session_header(sid, _complete(ctx, request, owner, body, model, sid))


async def _complete(ctx: AppContext, request: Request, owner: str, body: CompletionRequest, model: str,
                    sid: str | None) -> Response:
    if isinstance(body.prompt, str):
        await _refuse_surely_too_long(ctx, len(body.prompt.encode()), "prompt")
    ids = await asyncio.to_thread(_prompt_ids, ctx, body.prompt)

    def plan(session: SessionTurn | None) -> TurnTokens:
        gran = ctx.engine.write_granularity
        return session.plan_text(ids, gran) if session else build_text_turn(ids, granularity=gran)

    # OpenAI's default for legacy completions is 16 tokens
    turns = await _prepare(ctx, owner, body, sid, "completion", plan, body.max_tokens, 16, "prompt")
    return await _reply(ctx, request, turns, body, model, sid, chat=False)


async def _completion_events(ctx: AppContext, turns: list[Turn], model: str, include_usage: bool,
                             return_token_ids: bool) -> AsyncIterator[str]:
    first = turns[0]
    base = {"id": f"cmpl-{first.request_id}", "object": "text_completion", "created": first.created, "model": model,
            "system_fingerprint": None}
    text = TokenText(ctx.engine.tokenizer) if first.sampling.logprobs is not None else None
    offsets = [0] * len(turns)
    try:
        async for turn, out in _merged(ctx, turns):
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
                yield _sse(obj)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(turns)})
    except (APIError, EngineError) as exc:
        yield _error_event(exc)
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
