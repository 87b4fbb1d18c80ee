"""Concurrency: many sessions in parallel equal their serial replay; one session's requests are
serialised (FIFO; bounded wait → 409); a disconnected turn commits nothing."""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
import torch

from tests.server.conftest import (ENGINES, ThreadServer, app_kwargs_for, assert_openai_error, chat, export_state,
                                   make_settings)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(request, engine, tiny_paths, tmp_path_factory):
    settings = make_settings(tiny_paths, tmp_path_factory.mktemp("state"), engine=engine, device_pool_size=3,
                             host_pool_size=2)
    srv = ThreadServer(settings, **app_kwargs_for(request, engine)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def busy_server(request, engine, tiny_paths, tmp_path_factory):
    settings = make_settings(tiny_paths, tmp_path_factory.mktemp("state"), engine=engine, session_wait_timeout=0.3)
    srv = ThreadServer(settings, **app_kwargs_for(request, engine)).start()
    yield srv
    srv.stop()


def script(i: int) -> list[tuple[list[dict], int]]:
    """Per session: (messages, max_tokens) per turn, memory mode with a system prompt."""
    sys_msg = {"role": "system", "content": f"You are assistant number {i}."}
    return [([sys_msg, {"role": "user", "content": f"Session {i}, turn {t}: {'x' * (i + t)}"}], 2 + (i + t) % 5)
            for t in range(3)]


async def turn_async(c: httpx.AsyncClient, sid: str, msgs: list[dict], max_tokens: int, stream: bool) -> str:
    body = {"model": "tiny", "messages": msgs, "max_tokens": max_tokens, "temperature": 0, "session_id": sid,
            "stream": stream}
    if not stream:
        r = await c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    text = ""
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                obj = json.loads(line[6:])
                assert "error" not in obj, obj
                text += "".join(ch["delta"].get("content") or "" for ch in obj["choices"])
    return text


def test_parallel_sessions_equal_serial_replay(server):
    n = 8
    rng = random.Random(0)

    async def session(c: httpx.AsyncClient, i: int) -> list[str]:
        out = []
        for t, (msgs, mt) in enumerate(script(i)):
            await asyncio.sleep(rng.random() * 0.05)
            out.append(await turn_async(c, f"par-{i}", msgs, mt, stream=(i + t) % 2 == 0))
        return out

    async def all_sessions() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            return await asyncio.gather(*(session(c, i) for i in range(n)))

    parallel_texts = asyncio.run(all_sessions())
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for i in range(n):
            serial_texts = [chat(http, msgs, f"ser-{i}", max_tokens=mt)["choices"][0]["message"]["content"]
                            for msgs, mt in script(i)]
            assert serial_texts == parallel_texts[i]
            p, s = http.get(f"/v1/sessions/par-{i}").json(), http.get(f"/v1/sessions/ser-{i}").json()
            assert p["written_digest"] == s["written_digest"] and p["version"] == s["version"] == 3
            torch.testing.assert_close(export_state(http, f"par-{i}"), export_state(http, f"ser-{i}"),
                                       atol=1e-6, rtol=0)
        # and no two sessions ended with the same memory
        states = [export_state(http, f"par-{i}") for i in range(n)]
        assert all(not torch.equal(states[a], states[b]) for a in range(n) for b in range(a + 1, n))


def test_concurrent_requests_on_one_session_are_serialised(server):
    msgs = [[{"role": "user", "content": f"message {k}"}] for k in range(4)]

    async def fire() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            async def one(m):
                r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": m, "max_tokens": 6,
                                                               "temperature": 0, "session_id": "same"})
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(one(m) for m in msgs))

    results = asyncio.run(fire())
    versions = [r["delta_mem"]["version"] for r in results]
    assert sorted(versions) == [1, 2, 3, 4]
    order = sorted(range(4), key=lambda k: versions[k])
    with httpx.Client(base_url=server.url, timeout=120) as http:
        for k in order:  # replay in commit order on a fresh session
            chat(http, msgs[k], "same-replay", max_tokens=6)
        a, b = http.get("/v1/sessions/same").json(), http.get("/v1/sessions/same-replay").json()
        assert a["written_digest"] == b["written_digest"] and a["turns"] == 4
        torch.testing.assert_close(export_state(http, "same"), export_state(http, "same-replay"), atol=1e-6, rtol=0)


def wait_idle(srv: ThreadServer, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while srv.ctx.engine.health()["active_requests"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.ctx.engine.health()["active_requests"] == 0


def test_bounded_wait_409_and_disconnect_commits_nothing(busy_server):
    srv = busy_server
    sid = "busy"
    long_body = {"model": "tiny", "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 3000,
                 "temperature": 0, "ignore_eos": True, "session_id": sid}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        chat(http, [{"role": "user", "content": "first"}], sid)
        before, info = export_state(http, sid), http.get(f"/v1/sessions/{sid}").json()
        with httpx.Client(base_url=srv.url, timeout=60) as streamer:
            with streamer.stream("POST", "/v1/chat/completions", json={**long_body, "stream": True}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for _ in range(3):
                    next(lines)
                # the session is held by the stream: bounded wait, then 409
                busy = http.post("/v1/chat/completions", json={**long_body, "max_tokens": 2})
                assert_openai_error(busy, 409, "session_busy")
                assert busy.headers["x-session-id"] == sid
                # other sessions are not blocked
                chat(http, [{"role": "user", "content": "hello"}], "busy-other")
            # leaving the block closes the connection mid-stream: a disconnect
        wait_idle(srv)
        assert torch.equal(export_state(http, sid), before)
        assert http.get(f"/v1/sessions/{sid}").json()["version"] == info["version"]

        # a non-streamed request whose client gives up commits nothing either
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json=long_body, timeout=0.5)
        wait_idle(srv)
        assert torch.equal(export_state(http, sid), before)
        after = http.get(f"/v1/sessions/{sid}").json()
        assert after["version"] == info["version"] and after["written_digest"] == info["written_digest"]
        # and the session is usable again
        assert chat(http, [{"role": "user", "content": "again"}], sid)["delta_mem"]["version"] == info["version"] + 1
