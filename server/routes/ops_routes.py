"""Operations: /health (liveness), /ready (model, adapter and store), /metrics (Prometheus)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.context import ctx_of

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    ctx = ctx_of(request)
    checks: dict[str, Any] = {"accepting": ctx.accepting}
    eng = ctx.engine
    if eng is not None:
        checks.update(model=eng.model_name, adapter_fingerprint=eng.adapter_fingerprint, engine=eng.health())
    store_ok = False
    if ctx.store is not None:
        try:
            store_ok = bool(await asyncio.wait_for(asyncio.to_thread(ctx.store.ping), timeout=5))
        except Exception:  # noqa: BLE001 - unreachable = not ready
            store_ok = False
        checks["store"] = {"reachable": store_ok, "backend": ctx.settings.state_backend}
    ok = (ctx.accepting and eng is not None and store_ok
          and bool(checks.get("engine", {}).get("worker_alive", True)))
    return JSONResponse({"status": "ready" if ok else "not_ready", **checks}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    data = await asyncio.to_thread(ctx_of(request).metrics.render)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
