"""What every generation route shares: preparing a request's turns (session, tokens, budget),
running them to the end or as a stream, and the errors an engine failure becomes."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.context import AppContext
from server.engine.base import EngineError, RequestRejected
from server.errors import APIError, bad_request
from server.generation import Turn, decide_max_tokens, resolve_session_id, run_turn, sampling_from
from server.prompt import ChatMessage, TurnTokens, build_chat_turn
from server.schemas import DeltaMemOptions, _GenerationBody
from server.sessions import SessionTurn, check_session_id
from server.steps import Steps
from server.tools import ToolUse

T = TypeVar("T")


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_event(exc: BaseException) -> str:
    return sse((exc if isinstance(exc, APIError) else engine_error(exc)).body())


async def refuse_surely_too_long(ctx: AppContext, text_bytes: int, param: str) -> None:
    """400 before tokenising when the text cannot fit: no token covers more than the vocabulary's
    longest token, so the prompt has at least text_bytes / longest tokens."""
    longest = await ctx.longest_token_bytes()
    at_least = text_bytes // max(1, longest)
    if at_least > ctx.engine.max_model_len:
        raise APIError(400, f"this model's maximum context length is {ctx.engine.max_model_len} tokens; the "
                            f"{param} has at least {at_least} tokens ({text_bytes} bytes of text). Shorten the {param}.",
                       param=param, code="context_length_exceeded")


async def prepare(ctx: AppContext, owner: str, body: _GenerationBody, session_id: str | None, kind: str,
                   plan: Callable[[SessionTurn | None], TurnTokens], requested: int | None,
                   default: int | None, prompt_param: str, tool_use: ToolUse | None = None,
                   write: bool = True) -> list[Turn]:
    """Lock/load the session (if any), build the tokens, size the completion; one turn per choice.
    Errors here are plain HTTP errors (nothing has streamed yet) and leave the session untouched.
    The turn writes the session when both `write` and the request's delta_mem.write say so."""
    opts = body.delta_mem or DeltaMemOptions()
    write = write and opts.write
    n = body.n or 1
    if n > 1 and session_id is not None and write:
        raise bad_request("n > 1 needs a stateless or read-only request (delta_mem.write=false): n continuations "
                          "cannot all be committed to one session", param="n", code="invalid_value")
    session = None
    if session_id is not None:
        try:
            session = await ctx.sessions.begin_turn(owner, session_id, reset=opts.reset, write=write)
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
        return Turn(kind=kind, tokens=tokens, sampling=sampling, write=write, session=session,
                    tool_use=tool_use).branches(n)
    except BaseException:
        if session is not None:
            session.release()
        raise


def chat_tools(ctx: AppContext, body: Any) -> tuple[list[dict[str, Any]], ToolUse | None]:
    """The tools shown to the model and how the reply is read back (None without tools)."""
    tools, gran = body.tool_dicts(), ctx.engine.write_granularity
    if not tools:
        return [], None
    if gran != "token":
        raise bad_request(f"tools are not supported with a {gran} adapter (segment ids do not cover the "
                          "template's tool block)", param="tools", code="invalid_value")
    return tools, ToolUse(body.choice(), ctx.tool_parser(), parallel=body.parallel_tool_calls is not False)


def chat_plan(ctx: AppContext, messages: list[ChatMessage], tools: list[dict[str, Any]],
              check: Callable[[SessionTurn], None] | None = None,
              param: str = "messages") -> Callable[[SessionTurn | None], TurnTokens]:
    """How a chat-shaped request becomes tokens, on its session or without one; `check` vets the
    session first (under its lock)."""
    tok, gran = ctx.engine.tokenizer, ctx.engine.write_granularity

    def plan(session: SessionTurn | None) -> TurnTokens:
        if session is not None and check is not None:
            check(session)
        try:
            return (session.plan_chat(tok, messages, gran, tools) if session
                    else build_chat_turn(tok, messages, 0, granularity=gran, tools=tools))
        except Exception as exc:  # a template that rejects the conversation (e.g. role order)
            raise bad_request(f"the chat template cannot render these messages: {exc}", param=param,
                              code="invalid_messages") from None

    return plan


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
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


async def drain(ctx: AppContext, turns: list[Turn]) -> list[Turn]:
    try:
        async for _ in merged(ctx, turns):
            pass
    except EngineError as exc:
        raise engine_error(exc) from exc
    return turns


async def merged(ctx: AppContext, turns: list[Turn]) -> AsyncIterator[tuple[Turn, Any]]:
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


def engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, RequestRejected):
        return bad_request(str(exc), param=exc.param, code="invalid_value")
    return APIError(500, f"generation failed: {exc}", type="server_error", code="engine_error")


KEEPALIVE_SECONDS = 15.0


async def keepalive(events: AsyncIterator[str], every: float = KEEPALIVE_SECONDS) -> AsyncIterator[str]:
    """The events, plus an SSE comment whenever nothing was sent for `every` seconds (a long prefill
    or a queue), so that proxies keep the connection open. Clients skip comments: no one can read one
    as a first token."""
    steps = Steps(events)
    try:
        while True:
            while not (await asyncio.wait({steps.pending()}, timeout=every))[0]:
                yield ": keep-alive\n\n"
            try:
                item = steps.take()
            except StopAsyncIteration:
                return
            yield item
    finally:
        await steps.cancel()   # closed while waiting: the turn is cancelled there
        await events.aclose()   # type: ignore[attr-defined]


class TurnStream(StreamingResponse):
    """A streamed turn that always releases its session and closes its generator, even when the
    client disconnects before the body starts (the generator would then never run its finally).
    Nothing is sent before the engine's first token but the headers and keep-alive comments."""

    def __init__(self, content: AsyncIterator[str], turns: list[Turn], headers: dict[str, str]) -> None:
        super().__init__(keepalive(content), media_type="text/event-stream",
                         headers={**headers, "Cache-Control": "no-cache"})
        self._turns = turns

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(BaseException):
                await self.body_iterator.aclose()  # type: ignore[union-attr]
            for turn in self._turns:
                turn.release()


def session_headers(session_id: str | None) -> dict[str, str]:
    return {"X-Session-ID": session_id} if session_id else {}


async def with_session_header(session_id: str | None, work: Awaitable[Response]) -> Response:
    try:
        return await work
    except APIError as exc:
        if session_id:
            exc.headers = {**(exc.headers or {}), "X-Session-ID": session_id}
        raise


def resolve_session(request: Request, body: _GenerationBody) -> str | None:
    sid = resolve_session_id(body.session_id, request.headers.get("x-session-id"))
    return check_session_id(sid) if sid is not None else None
