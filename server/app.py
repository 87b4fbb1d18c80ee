"""The FastAPI application: wiring of engine, store, session manager, auth, metrics and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import Authenticator
from server.context import AppContext
from server.errors import APIError, error_response, install_error_handlers
from server.metrics import Metrics
from server.sessions import EngineIdentity, SessionManager
from server.settings import Settings
from server.response_store import ResponseStore
from server.state_store import build_store

log = logging.getLogger("deltamem.server")


class _BodyLimit:
    """413 for request bodies over the limit, before any parsing: at once when the declared length is
    too big; for a chunked body (no length) as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(APIError(413, f"request body exceeds {self.max_bytes} bytes",
                                          code="request_too_large"))
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None:   # the server enforces the declared length: checking it is enough
            if not declared.isdigit() or int(declared) > self.max_bytes:
                return await too_big(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, seen = [], 0
        while True:   # chunked: read it here, so that going over is a 413, not a body-parsing error
            msg = await receive()
            if msg["type"] != "http.request":
                return   # the client went away
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()   # after the body: disconnect notices
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class _RequestMetrics:
    """Counts requests and their latency (to the last byte) by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t0)


def create_app(settings: Settings, *, engine: Any = None, backend: Any = None) -> FastAPI:
    """Build the app. `engine`/`backend` may be injected (tests, benchmarks); else built from settings
    at startup (model loading runs in a thread so the loop stays responsive)."""
    from server.routes import openai_routes, ops_routes, responses_routes, session_routes, tokenize_routes

    metrics = Metrics()
    ctx = AppContext(settings=settings, metrics=metrics, auth=Authenticator(settings.api_keys))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine   # an injected engine belongs to the caller: started here, never stopped
        if eng is None:
            from server.engine import build_engine

            eng = await asyncio.to_thread(build_engine, settings)
        await eng.start()
        store = build_store(settings, eng, on_event=metrics.on_store_event, backend=backend)
        metrics.attach_store(store.stats)
        ctx.engine, ctx.store = eng, store
        await asyncio.to_thread(ctx.tool_parser)   # vLLM's parsers import vLLM: not on the first request
        ctx.sessions = SessionManager(
            store,
            EngineIdentity(tuple(eng.state_shape), list(eng.layer_names), eng.adapter_fingerprint,
                           eng.model_fingerprint, eng.zero_state, vocab_size=len(eng.tokenizer)),
            auto_create=settings.auto_create_sessions, default_ttl=settings.session_ttl,
            wait_timeout=settings.session_wait_timeout, message_log_max=settings.message_log_max,
            keep_written_tokens=settings.record_written_tokens,
            max_sessions_per_owner=settings.max_sessions_per_owner,
            max_stored_bytes_per_owner=settings.max_stored_bytes_per_owner,
        )
        ctx.responses = ResponseStore(store, ctx.sessions.quota)
        ctx.accepting = True
        sweeper = asyncio.create_task(_sweep_forever(ctx))
        log.info("ready: model %s, adapter %s…, state backend %s", eng.model_name, eng.adapter_fingerprint[:12],
                 settings.state_backend)
        try:
            yield
        finally:
            # uvicorn has already stopped accepting and given in-flight turns the grace period
            ctx.accepting = False
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            if engine is None:
                await eng.stop()
            try:
                flushed = await asyncio.to_thread(store.flush)
                log.info("shutdown: %d dirty state(s) persisted", flushed)
            except Exception:  # noqa: BLE001
                log.exception("shutdown: persisting dirty states failed")
            await asyncio.to_thread(_close_backend, store)

    app = FastAPI(title="delta-mem-vllm", version="0.1.0", lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(session_routes.router)
    app.include_router(tokenize_routes.router)
    app.include_router(ops_routes.router)
    app.add_middleware(_BodyLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(_RequestMetrics, metrics=metrics)
    return app


def _close_backend(store: Any) -> None:
    backend = getattr(store, "backend", None)
    if backend is not None and hasattr(backend, "close"):
        backend.close()


async def _sweep_forever(ctx: AppContext) -> None:
    while True:
        await asyncio.sleep(ctx.settings.ttl_sweep_interval)
        try:
            n = await ctx.sessions.sweep_expired()  # type: ignore[union-attr]
            if n:
                log.info("ttl: %d expired session(s) deleted", n)
        except Exception:  # noqa: BLE001
            log.exception("ttl sweep failed")
