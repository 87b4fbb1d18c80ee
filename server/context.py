"""What every route needs (engine, session manager, settings, metrics, auth), kept apart from the app
factory so that routes import it without importing the app that includes them."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from server.auth import Authenticator
from server.errors import APIError
from server.metrics import Metrics
from server.sessions import SessionManager
from server.settings import Settings


@dataclass
class AppContext:
    """Everything a route needs, on app.state.ctx."""

    settings: Settings
    metrics: Metrics
    auth: Authenticator
    engine: Any = None
    store: Any = None
    sessions: SessionManager | None = None
    responses: Any = None          # ResponseStore: stored Responses API responses
    started_at: float = field(default_factory=time.time)
    accepting: bool = False
    # set when shutdown's grace period is nearly over: running turns stop (not committed) and say so
    draining: asyncio.Event = field(default_factory=asyncio.Event)

    _longest_token: int | None = None
    _tool_parser: Any = None

    def tool_parser(self) -> Any:
        """The parser that reads tool calls back from replies (--tool-call-parser)."""
        if self._tool_parser is None:
            if importlib.util.find_spec("vllm") is not None:   # vLLM's own parsers wherever vLLM is installed
                from server.engine.vllm_tools import VllmToolParser

                self._tool_parser = VllmToolParser(self.settings.tool_call_parser, self.engine.tokenizer)
            else:
                from server.tools import HermesToolParser

                self._tool_parser = HermesToolParser()
        return self._tool_parser

    async def longest_token_bytes(self) -> int:
        """UTF-8 length of the vocabulary's longest token (computed once, off the event loop)."""
        if self._longest_token is None:
            tok = self.engine.tokenizer

            def longest() -> int:
                return max((len(t.encode("utf-8", "replace")) for t in tok.convert_ids_to_tokens(list(range(len(tok))))
                            if t is not None), default=1)

            self._longest_token = await asyncio.to_thread(longest)
        return self._longest_token

    def check_model(self, model: str | None) -> str:
        """The served model's name; 404 when a request names another."""
        name = self.engine.model_name
        if model is not None and model != name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {name!r}", param="model",
                           code="model_not_found")
        return name

    def require_ready(self) -> None:
        if not self.accepting or self.engine is None or self.sessions is None:
            raise APIError(503, "server is starting or shutting down", code="unavailable")


def ctx_of(request: Request) -> AppContext:
    return request.app.state.ctx


def owner_of(request: Request) -> str:
    """FastAPI dependency: authenticate and return the caller's owner id."""
    return ctx_of(request).auth(request)
