"""Streams tell the truth about time to first token: no chunk with `choices` (chat, completions) and no
output item (Responses API) reaches the client before the engine produced its first token. A client
that times the first chunk (vLLM's benchmark, any UI) then measures the prefill, as against vLLM's own
server. The prompt is long enough that its prefill takes many engine steps; the engine's first token
is stamped where the server receives it, on the same clock as the client."""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

import httpx
import pytest

PROMPT = " ".join(f"word{i % 97}" for i in range(300))   # several hundred tokens: a prefill of many steps


@pytest.fixture
def first_token_at(server, monkeypatch) -> list[float]:
    """Times (monotonic) at which the engine handed the server a first token, one per request."""
    engine = server.ctx.engine
    stamps: list[float] = []
    generate = engine.generate

    async def stamped(request: Any) -> AsyncIterator[Any]:
        first = True
        async for out in generate(request):
            if first and out.token_ids:
                stamps.append(time.monotonic())
                first = False
            yield out

    monkeypatch.setattr(engine, "generate", stamped)
    return stamps


def _events(server, path: str, body: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """(arrival time, event) of every data event of a streamed request."""
    out = []
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append((time.monotonic(), json.loads(line[6:])))
    return out


def test_chat_sends_its_first_chunk_with_the_first_token(server, first_token_at):
    sent = time.monotonic()
    events = _events(server, "/v1/chat/completions", {"model": "tiny", "max_tokens": 3, "temperature": 0,
                                                     "messages": [{"role": "user", "content": PROMPT}]})
    (engine_first,) = first_token_at
    with_choices = [(t, e) for t, e in events if e.get("choices")]
    assert with_choices[0][1]["choices"][0]["delta"]["role"] == "assistant"
    assert with_choices[0][0] >= engine_first > sent


def test_completions_send_nothing_before_the_first_token(server, first_token_at):
    events = _events(server, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 3,
                                                 "temperature": 0})
    (engine_first,) = first_token_at
    assert events and events[0][0] >= engine_first


def test_responses_open_their_output_with_the_first_token(server, first_token_at):
    events = []
    with httpx.stream("POST", f"{server.url}/v1/responses", timeout=120,
                      json={"model": "tiny", "input": PROMPT, "max_output_tokens": 3, "temperature": 0,
                            "store": False, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append((time.monotonic(), json.loads(line[6:])["type"]))
    (engine_first,) = first_token_at
    kinds = [k for _, k in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]   # may come early, as OpenAI's do
    later = [(t, k) for t, k in events if k not in ("response.created", "response.in_progress")]
    assert later[0][1] == "response.output_item.added" and later[0][0] >= engine_first


def test_a_silent_wait_sends_keepalive_comments_and_closing_cancels_the_turn():
    import asyncio

    from server.routes.turns import keepalive

    cleaned: list[str] = []

    async def slow() -> AsyncIterator[str]:
        try:
            await asyncio.sleep(0.35)
            yield "data: 1\n\n"
            await asyncio.sleep(10)
            yield "data: never\n\n"
        finally:
            cleaned.append("inner closed")

    async def consume() -> list[str]:
        got = []
        stream = keepalive(slow(), every=0.1)
        async for item in stream:
            got.append(item)
            if len(got) == 6:
                break
        await stream.aclose()
        return got

    got = asyncio.run(consume())
    assert got[:3] == [": keep-alive\n\n"] * 3 and got[3] == "data: 1\n\n"
    assert got[4:] == [": keep-alive\n\n"] * 2
    assert cleaned == ["inner closed"]
