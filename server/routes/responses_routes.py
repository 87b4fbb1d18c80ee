"""The Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}, GET …/input_items.

A response continues from `previous_response_id` through the session memory: the previous
response's session is loaded and only the new input is sent to the model, as in memory mode. A
chain's session is named after its first response unless the request names one (`session_id` or
X-Session-ID). The memory is linear: a response continues only from its session's latest response.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse

from delta_mem_vllm.state import QuotaExceeded, VersionConflict
from server.context import AppContext, ctx_of, owner_of
from server.engine.base import EngineError
from server.errors import APIError, bad_request, conflict, not_found
from server.generation import Turn
from server.logprobs import TokenText, chat_logprobs
from server.responses_output import ResponseEvents, ResponseShape, new_response_id, output_items, usage
from server.responses_schema import ResponseRequest
from server.routes.turns import (TurnStream, chat_plan, chat_tools, drain, engine_error, merged, prepare,
                                 refuse_surely_too_long, resolve_session, session_headers, until_disconnect,
                                 with_session_header)
from server.sessions import SessionTurn, quota_error

router = APIRouter()


async def _store_call(what: str, fn: Any, *args: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args)
    except QuotaExceeded as exc:
        raise quota_error(exc) from exc
    except VersionConflict as exc:
        raise conflict(f"the session was deleted while {what}: {exc}", code="session_conflict") from exc
    except Exception as exc:  # noqa: BLE001 - an unreachable store is the client's 503, not a 500
        raise APIError(503, f"response store unavailable while {what}: {exc}", code="store_unavailable") from exc


async def _stored(ctx: AppContext, owner: str, response_id: str, param: str | None = None) -> dict[str, Any]:
    """A stored response whose session is still the one it was written in, else 404."""
    doc = await _store_call("reading a response", ctx.responses.get, owner, response_id)
    sid = doc.get("session_id") if doc else None
    if doc is not None and sid is not None:
        incarnation = await ctx.sessions.incarnation(owner, sid)  # type: ignore[union-attr]
        if incarnation is None or incarnation != doc.get("incarnation", incarnation):
            doc = None   # its session expired, or was deleted (and perhaps created again): it went with it
    if doc is None:
        raise not_found(f"response {response_id!r} not found", param=param, code="response_not_found")
    return doc


class _Keeper:
    """Stores the response of a turn (store: true), as the turn commits."""

    def __init__(self, ctx: AppContext, owner: str, shape: ResponseShape, items: list[dict[str, Any]]) -> None:
        self.ctx, self.owner, self.shape, self.items = ctx, owner, shape, items
        self.saved_in: str | None = None    # the session it was stored with

    async def save(self, turn: Turn) -> None:
        assert turn.session is not None   # store: true always has a session (named, or the chain's own)
        committing = turn.write
        document = {"response": _final(self.ctx, self.shape, turn, committing), "input_items": self.items,
                    "session_id": turn.session.session_id, "incarnation": turn.session.record.incarnation,
                    "written": committing}
        await _store_call("storing the response", self.ctx.responses.put, self.owner, self.shape.id, document)
        self.saved_in = turn.session.session_id

    async def discard(self) -> None:
        if self.saved_in is not None:
            await _store_call("removing a response", self.ctx.responses.delete, self.owner, self.shape.id,
                              self.saved_in)


def _logprobs(ctx: AppContext, turn: Turn) -> list[dict[str, Any]] | None:
    if turn.sampling.logprobs is None:
        return None
    return chat_logprobs(turn.logprobs, TokenText(ctx.engine.tokenizer))["content"]


def _final(ctx: AppContext, shape: ResponseShape, turn: Turn, committing: bool = False) -> dict[str, Any]:
    """The finished response object (what the POST returns, the stream ends with and GET reads);
    `committing`: stored just before the commit, it describes the session as the commit leaves it."""
    assert turn.final is not None
    content, calls = turn.reply()
    length = turn.final.finish_reason == "length"
    info = turn.delta_mem_info()
    if committing:
        info["committed"], info["version"] = True, info["version"] + 1
    return shape.object("incomplete" if length else "completed",
                        output_items(shape.id, content, calls, _logprobs(ctx, turn)),
                        usage(turn.final.prompt_tokens, turn.final.completion_tokens),
                        incomplete="max_output_tokens" if length else None, delta_mem=info)


def _input_items(body: ResponseRequest, response_id: str) -> list[dict[str, Any]]:
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": body.input}]}] \
        if isinstance(body.input, str) else [dict(item) for item in body.input]
    for i, item in enumerate(items):
        item.setdefault("id", f"in_{response_id.removeprefix('resp_')}_{i}")
    return items


@router.post("/v1/responses")
async def create_response(body: ResponseRequest, request: Request, owner: str = Depends(owner_of)) -> Response:
    ctx = ctx_of(request)
    ctx.require_ready()
    model = ctx.check_model(body.model)
    named = resolve_session(request, body)
    response_id = new_response_id()
    sid = named
    if body.previous_response_id is not None:
        previous = await _stored(ctx, owner, body.previous_response_id, "previous_response_id")
        sid = previous["session_id"]
        if named is not None and named != sid:
            raise bad_request(f"previous_response_id belongs to session {sid!r}, not {named!r}", param="session_id",
                              code="session_id_conflict")
    elif sid is None and body.store:
        sid = response_id          # a new chain: its session is named after its first response
        await ctx.sessions.create(owner, sid, ttl=ctx.settings.responses_session_ttl)  # type: ignore[union-attr]
        try:
            return await with_session_header(sid, _respond(ctx, request, owner, body, model, sid, response_id))
        except BaseException:      # refused before it ran: no empty session left behind
            with contextlib.suppress(Exception):
                await ctx.sessions.delete(owner, sid)  # type: ignore[union-attr]
            raise
    return await with_session_header(sid, _respond(ctx, request, owner, body, model, sid, response_id))


async def _respond(ctx: AppContext, request: Request, owner: str, body: ResponseRequest, model: str,
                   sid: str | None, response_id: str) -> Response:
    messages = body.messages()
    await refuse_surely_too_long(ctx, sum(len(m.content.encode()) for m in messages), "input")
    tools, tool_use = chat_tools(ctx, body)
    previous = body.previous_response_id

    def latest(session: SessionTurn) -> None:
        if previous is not None and session.record.last_response_id != previous:
            raise conflict(f"response {previous!r} is not the latest turn of session {session.session_id!r}: its "
                           "memory has moved on and cannot be rewound. Continue from the latest response "
                           f"({session.record.last_response_id or 'none: a later turn came from another route'})"
                           " or fork the session.", code="response_not_latest", param="previous_response_id")

    plan = chat_plan(ctx, messages, tools, latest, "input")
    (turn,) = await prepare(ctx, owner, body, sid, "response", plan, body.max_output_tokens,
                            ctx.settings.default_max_tokens, "input", tool_use=tool_use, write=body.store)
    shape = ResponseShape(response_id, int(time.time()), model, body)
    turn.response_id = response_id
    if body.store:
        turn.keeper = _Keeper(ctx, owner, shape, _input_items(body, response_id))
    headers = session_headers(sid)
    if body.stream:
        return TurnStream(_events(ctx, turn, shape), [turn], headers)
    try:
        if await until_disconnect(request, drain(ctx, [turn])) is None:
            return Response(status_code=499)
    finally:
        turn.release()
    return JSONResponse(_final(ctx, shape, turn), headers=headers)


async def _events(ctx: AppContext, turn: Turn, shape: ResponseShape) -> AsyncIterator[str]:
    events = ResponseEvents(shape.id)
    text = TokenText(ctx.engine.tokenizer) if turn.sampling.logprobs is not None else None
    turn.stream_tools()
    for line in events.start(shape.object("in_progress", [])):
        yield line
    try:
        async for _, out in merged(ctx, [turn]):
            logprobs = chat_logprobs(out.logprobs, text)["content"] if text is not None and out.logprobs else None
            if turn.tool_use is None:
                if out.text:
                    for line in events.content(out.text, logprobs):
                        yield line
            else:
                step = turn.take_steps()
                if step.content:
                    for line in events.content(step.content, logprobs):
                        yield line
                for delta in step.calls:
                    for line in events.call(delta):
                        yield line
            if out.finished:
                for line in events.finish(_final(ctx, shape, turn)):
                    yield line
    except (APIError, EngineError) as exc:
        err = (exc if isinstance(exc, APIError) else engine_error(exc)).body()["error"]
        for line in events.fail(err, shape.object("failed", [])):
            yield line


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request, owner: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = ctx_of(request)
    ctx.require_ready()
    return (await _stored(ctx, owner, response_id))["response"]


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request, owner: str = Depends(owner_of),
                           order: str = Query("desc", pattern="^(asc|desc)$"),
                           limit: int = Query(20, ge=1, le=100), after: str | None = None) -> dict[str, Any]:
    ctx = ctx_of(request)
    ctx.require_ready()
    items = (await _stored(ctx, owner, response_id))["input_items"]
    items = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise bad_request(f"no input item {after!r} in response {response_id!r}", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request, owner: str = Depends(owner_of)) -> dict[str, Any]:
    """Forgets the stored response; the session memory it wrote stays (delete the session for that)."""
    ctx = ctx_of(request)
    ctx.require_ready()
    doc = await _stored(ctx, owner, response_id)
    await _store_call("deleting a response", ctx.responses.delete, owner, response_id, doc["session_id"])
    return {"id": response_id, "object": "response.deleted", "deleted": True}
