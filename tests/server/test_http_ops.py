"""/health, /ready and /metrics report real values; states are evicted and restored transparently;
the Redis backend serves sessions across a restart."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from tests.redis_server import RedisServer, redis_server_binary
from tests.server.conftest import ThreadServer, chat, export_state, make_settings


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    assert found, f"no sample {name}{labels}"
    return total


@pytest.fixture(scope="module")
def server(tiny_paths, tmp_path_factory):
    settings = make_settings(tiny_paths, tmp_path_factory.mktemp("state"), device_pool_size=1, host_pool_size=1)
    srv = ThreadServer(settings).start()
    yield srv
    srv.stop()


def test_health_and_ready(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/health").json() == {"status": "ok"}
        r = http.get("/ready")
        assert r.status_code == 200
        ready = r.json()
        assert ready["status"] == "ready" and ready["model"] == "tiny"
        assert ready["adapter_fingerprint"] == server.ctx.engine.adapter_fingerprint
        assert ready["store"] == {"reachable": True, "backend": "filesystem"}
        assert ready["engine"]["worker_alive"] is True


def test_metrics_and_restore_after_eviction(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for sid in ("m-a", "m-b", "m-c"):   # device pool 1, host pool 1: m-a ends up on disk only
            chat(http, [{"role": "user", "content": f"hello {sid}"}], sid, max_tokens=3)
        stream_body = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                       "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=stream_body) as r:
            list(r.iter_lines())
        assert http.get("/v1/sessions/m-c").json()["residency"] == "device"
        tiers = {sid: server.ctx.store.tier_of(_key(sid)) for sid in ("m-a", "m-b", "m-c")}
        assert tiers["m-a"] == "persistent", tiers
        before = export_state(http, "m-a")          # restored from the filesystem tier
        m0 = http.get("/metrics").text
        chat(http, [{"role": "user", "content": "more"}], "m-b", max_tokens=2)   # restored again
        m = http.get("/metrics")
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        text = m.text
    assert metric(text, "deltamem_http_requests_total", route="/v1/chat/completions", status="200") >= 5
    assert metric(text, "deltamem_http_request_duration_seconds_count", route="/v1/chat/completions") >= 5
    assert metric(text, "deltamem_time_to_first_token_seconds_count", endpoint="chat") >= 5
    assert metric(text, "deltamem_prompt_tokens_total") > 0
    assert metric(text, "deltamem_generation_tokens_total") >= 14
    assert metric(text, "deltamem_written_tokens_total") > 0
    assert metric(text, "deltamem_turns_total", kind="chat", outcome="committed") >= 4
    assert metric(text, "deltamem_turns_total", kind="chat", outcome="stateless") >= 1
    assert metric(text, "deltamem_sessions_resident", tier="device") == 1
    assert metric(text, "deltamem_sessions_resident", tier="host") == 1
    assert metric(text, "deltamem_state_bytes", tier="device") == before.numel() * 4
    assert metric(text, "deltamem_state_restores_total") > metric(m0, "deltamem_state_restores_total") >= 1
    assert metric(text, "deltamem_state_evictions_total", tier="device") >= 2
    assert metric(text, "deltamem_state_persists_total") >= 4
    assert metric(text, "deltamem_state_persist_seconds_count") >= 4
    assert metric(text, "deltamem_state_restore_seconds_count") >= 1
    assert metric(text, "deltamem_state_persist_failures_total") == 0
    assert metric(text, "deltamem_active_generations") == 0
    assert torch.isfinite(before).all() and before.abs().sum() > 0


def _key(sid: str) -> str:
    from delta_mem_vllm.state import storage_key

    return storage_key("", sid)


@pytest.mark.skipif(redis_server_binary() is None, reason="redis-server not installed")
def test_redis_backend_survives_restart_and_reports_readiness(tiny_paths, tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    try:
        settings = make_settings(tiny_paths, tmp_path / "unused", state_backend="redis", redis_url=redis.url,
                                 redis_prefix="dm-test:")
        srv = ThreadServer(settings).start()
        try:
            with httpx.Client(base_url=srv.url, timeout=60) as http:
                assert http.get("/ready").json()["store"] == {"reachable": True, "backend": "redis"}
                chat(http, [{"role": "user", "content": "one"}], "r1")
                chat(http, [{"role": "user", "content": "two"}], "r1")
                state, info = export_state(http, "r1"), http.get("/v1/sessions/r1").json()
        finally:
            srv.stop()
        srv = ThreadServer(settings).start()     # a fresh process state: only Redis remembers
        try:
            with httpx.Client(base_url=srv.url, timeout=60) as http:
                got = http.get("/v1/sessions/r1").json()
                assert got["version"] == info["version"] == 2 and got["written_digest"] == info["written_digest"]
                assert torch.equal(export_state(http, "r1"), state)
                assert "r1" in {s["id"] for s in http.get("/v1/sessions").json()["data"]}
                redis.stop()
                r = http.get("/ready")
                assert r.status_code == 503 and r.json()["store"]["reachable"] is False
        finally:
            srv.stop()
    finally:
        redis.stop()
