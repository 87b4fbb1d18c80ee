"""Session API: create, inspect, list, delete, reset, fork, export and import states."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request

from server.context import AppContext, ctx_of, owner_of
from server.errors import bad_request
from server.schemas import SessionCreateRequest, SessionForkRequest, session_object
from server.sessions import check_session_id

router = APIRouter(prefix="/v1/sessions")


def _ready(request: Request) -> AppContext:
    ctx = ctx_of(request)
    ctx.require_ready()
    return ctx


def _obj(ctx: AppContext, rec: Any, **kw: Any) -> dict[str, Any]:
    return session_object(rec, adapter_fingerprint=ctx.engine.adapter_fingerprint,
                          include_tokens=ctx.settings.record_written_tokens, **kw)


@router.post("")
async def create_session(request: Request, body: SessionCreateRequest | None = Body(None),
                         owner: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = _ready(request)
    body = body or SessionCreateRequest()
    rec = await ctx.sessions.create(owner, body.id, ttl=body.ttl, metadata=body.metadata)
    return _obj(ctx, rec, tier=await _tier(ctx, owner, rec.session_id))


async def _tier(ctx: AppContext, owner: str, session_id: str) -> str | None:
    _, _, tier = await ctx.sessions.get(owner, session_id)
    return tier


@router.get("")
async def list_sessions(request: Request, limit: int = Query(100, ge=1, le=1000), after: str | None = None,
                        owner: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = _ready(request)
    if after is not None:
        check_session_id(after, "after")
    recs, has_more = await ctx.sessions.list(owner, limit=limit, after=after)
    problems = await ctx.sessions.state_problems(owner, recs)
    data = [_obj(ctx, r, state_error=problems.get(r.session_id)) for r in recs]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


@router.get("/{session_id}")
async def get_session(session_id: str, request: Request, owner: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = _ready(request)
    rec, state, tier = await ctx.sessions.get(owner, session_id)
    return _obj(ctx, rec, tier=tier, state=state)


@router.delete("/{session_id}")
async def delete_session(session_id: str, request: Request, owner: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = _ready(request)
    await ctx.sessions.delete(owner, session_id)
    return {"id": session_id, "object": "session.deleted", "deleted": True}


@router.post("/{session_id}/reset")
async def reset_session(session_id: str, request: Request, owner: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = _ready(request)
    rec = await ctx.sessions.reset(owner, session_id)
    rec, state, tier = await ctx.sessions.get(owner, rec.session_id)
    return _obj(ctx, rec, tier=tier, state=state)


@router.post("/{session_id}/fork")
async def fork_session(session_id: str, request: Request, body: SessionForkRequest | None = Body(None),
                       owner: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = _ready(request)
    body = body or SessionForkRequest()
    rec = await ctx.sessions.fork(owner, check_session_id(session_id), body.id, ttl=body.ttl, metadata=body.metadata)
    rec, state, tier = await ctx.sessions.get(owner, rec.session_id)
    return _obj(ctx, rec, tier=tier, state=state)


@router.get("/{session_id}/state")
async def export_state(session_id: str, request: Request, owner: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = _ready(request)
    doc = await ctx.sessions.export(owner, session_id)
    return {**doc, "session_id": session_id}


@router.put("/{session_id}/state")
async def import_state(session_id: str, request: Request, document: Any = Body(...),
                       owner: str = Depends(owner_of)) -> dict[str, Any]:
    ctx = _ready(request)
    if not isinstance(document, dict):
        raise bad_request("the body must be a state document (as returned by GET /v1/sessions/{id}/state)",
                          code="invalid_state")
    rec = await ctx.sessions.import_(owner, session_id, document)
    rec, state, tier = await ctx.sessions.get(owner, rec.session_id)
    return _obj(ctx, rec, tier=tier, state=state)
