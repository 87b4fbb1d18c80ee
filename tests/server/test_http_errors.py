"""Bad input gets the right status and OpenAI's error shape, never a 500. API keys own sessions."""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest

from tests.server.conftest import ThreadServer, assert_openai_error, make_settings

KA, KB = "key-alice", "key-bob"


@pytest.fixture(scope="module")
def server(tiny_paths, tmp_path_factory):
    settings = make_settings(tiny_paths, tmp_path_factory.mktemp("state"), api_keys=[KA, KB],
                             auto_create_sessions=False, max_model_len=64, max_request_bytes=64 * 1024)
    srv = ThreadServer(settings).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alice(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KA}"}) as c:
        yield c


@pytest.fixture(scope="module")
def bob(server):
    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {KB}"}) as c:
        yield c


def body(**kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, **kw}


def test_auth(server, alice):
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        assert_openai_error(anon.post("/v1/chat/completions", json=body()), 401, "invalid_api_key")
        assert_openai_error(anon.get("/v1/models"), 401)
        assert_openai_error(anon.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
        assert_openai_error(anon.get("/v1/sessions", headers={"Authorization": "Basic abc"}), 401)
        assert anon.get("/health").status_code == 200   # probes need no key
    assert alice.get("/v1/models").status_code == 200
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_sessions_belong_to_their_key(alice, bob):
    assert alice.post("/v1/sessions", json={"id": "owned"}).status_code == 200
    assert alice.post("/v1/chat/completions", json=body(session_id="owned")).status_code == 200
    for r in (bob.get("/v1/sessions/owned"), bob.delete("/v1/sessions/owned"), bob.get("/v1/sessions/owned/state"),
              bob.post("/v1/sessions/owned/reset"), bob.post("/v1/sessions/owned/fork"),
              bob.post("/v1/chat/completions", json=body(session_id="owned"))):
        assert_openai_error(r, 404)
    assert "owned" not in {s["id"] for s in bob.get("/v1/sessions").json()["data"]}
    assert "owned" in {s["id"] for s in alice.get("/v1/sessions").json()["data"]}
    assert alice.get("/v1/sessions/owned").json()["turns"] == 1


def test_unknown_session_with_auto_create_off(alice):
    err = assert_openai_error(alice.post("/v1/chat/completions", json=body(session_id="ghost")), 404,
                              "session_not_found")
    assert "ghost" in err["message"]
    assert_openai_error(alice.get("/v1/sessions/ghost"), 404, "session_not_found")


def test_malformed_and_missing(alice):
    err = assert_openai_error(alice.post("/v1/chat/completions", content=b"{not json",
                                         headers={"content-type": "application/json"}), 400, "invalid_json")
    assert "JSON" in err["message"]
    assert_openai_error(alice.post("/v1/chat/completions", json={"model": "tiny"}), 400,
                        "missing_required_parameter", "messages")
    assert_openai_error(alice.post("/v1/chat/completions", json=body(messages=[])), 400, param="messages")
    assert_openai_error(alice.post("/v1/chat/completions", json=body(messages=[{"role": "wizard", "content": "x"}])),
                        400, param="messages.0.role")
    assert_openai_error(alice.post("/v1/chat/completions", json=body(max_tokens="many")), 400, param="max_tokens")
    assert_openai_error(alice.post("/v1/chat/completions", json=body(max_tokens=0)), 400, param="max_tokens")
    assert_openai_error(alice.post("/v1/chat/completions", json=body(temperature=7)), 400, param="temperature")
    assert_openai_error(alice.post("/v1/chat/completions", json=body(top_p=0)), 400, param="top_p")
    assert_openai_error(alice.post("/v1/chat/completions", json=body(n=17)), 400, param="n")
    assert_openai_error(alice.post("/v1/chat/completions", json=body(seed=2**70)), 400, param="seed")
    assert_openai_error(alice.post("/v1/chat/completions", json=body(logit_bias={"99999": 5})), 400, param="logit_bias")
    assert_openai_error(alice.post("/v1/chat/completions", json=body(logit_bias={"x": 5})), 400)
    assert_openai_error(alice.post("/v1/chat/completions", json=body(delta_mem={"forget": True})), 400)
    assert_openai_error(alice.post("/v1/chat/completions", json=body(model="gpt-9")), 404, "model_not_found")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_openai_error(alice.post("/v1/chat/completions", json=body(messages=image)), 400, param="messages")
    assert_openai_error(alice.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"]}), 400,
                        param="prompt")
    assert_openai_error(alice.post("/v1/completions", json={"model": "tiny", "prompt": ""}), 400, param="prompt")
    assert_openai_error(alice.post("/v1/completions", json={"model": "tiny", "prompt": [10**9]}), 400)
    assert_openai_error(alice.get("/v1/nothing-here"), 404)
    assert_openai_error(alice.delete("/v1/chat/completions"), 405)
    assert_openai_error(alice.get("/v1/sessions", params={"limit": 0}), 400, param="limit")
    assert_openai_error(alice.post("/v1/sessions", json={"ttl": -1}), 400, param="ttl")
    assert_openai_error(alice.post("/v1/sessions", json={"metadata": {"k": "v" * 600}}), 400)


@pytest.mark.parametrize("bad", ["", "has space", "slash/../x", "x" * 129, "ünïcode", "semi;colon"])
def test_invalid_session_ids(alice, bad):
    assert_openai_error(alice.post("/v1/chat/completions", json=body(session_id=bad)), 400, "invalid_session_id")
    assert_openai_error(alice.post("/v1/sessions", json={"id": bad}), 400, "invalid_session_id")
    if bad.isascii() and bad and "/" not in bad and " " not in bad:
        assert_openai_error(alice.post("/v1/chat/completions", json=body(), headers={"X-Session-ID": bad}), 400,
                            "invalid_session_id")


def test_header_body_conflict(alice):
    alice.post("/v1/sessions", json={"id": "conf-a"})
    r = alice.post("/v1/chat/completions", json=body(session_id="conf-a"), headers={"X-Session-ID": "conf-b"})
    assert_openai_error(r, 400, "session_id_conflict", "session_id")
    assert alice.post("/v1/chat/completions", json=body(session_id="conf-a"),
                      headers={"X-Session-ID": "conf-a"}).status_code == 200


def test_context_length(alice):
    long = [{"role": "user", "content": "word " * 80}]
    err = assert_openai_error(alice.post("/v1/chat/completions", json=body(messages=long)), 400,
                              "context_length_exceeded")
    assert "64" in err["message"]
    # fits, but not with the requested completion
    assert_openai_error(alice.post("/v1/chat/completions", json=body(max_tokens=60)), 400, "context_length_exceeded")
    assert alice.post("/v1/chat/completions", json=body(max_tokens=10)).status_code == 200
    # a session turn that is too long leaves the session as it was
    alice.post("/v1/sessions", json={"id": "ctx-s"})
    assert_openai_error(alice.post("/v1/chat/completions", json=body(messages=long, session_id="ctx-s")), 400,
                        "context_length_exceeded")
    assert alice.get("/v1/sessions/ctx-s").json()["version"] == 0
    client = openai.OpenAI(base_url=f"{str(alice.base_url).rstrip('/')}/v1", api_key=KA, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long, max_tokens=2)
    assert e.value.code == "context_length_exceeded"


def test_oversize_body(alice):
    huge = body(messages=[{"role": "user", "content": "x" * 100_000}])
    assert_openai_error(alice.post("/v1/chat/completions", json=huge), 413, "request_too_large")
    raw = json.dumps(huge).encode()
    # chunked (no Content-Length): the same 413, not a body-parsing error
    chunked = alice.post("/v1/chat/completions", content=(raw[i:i + 8192] for i in range(0, len(raw), 8192)),
                         headers={"Content-Type": "application/json"})
    assert "content-length" not in chunked.request.headers
    assert_openai_error(chunked, 413, "request_too_large")
    small = json.dumps(body(messages=[{"role": "user", "content": "hi"}], max_tokens=1)).encode()
    ok = alice.post("/v1/chat/completions", content=iter([small[:10], small[10:]]),
                    headers={"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_junk_bodies_never_500(alice):
    rng = random.Random(0)
    values = [None, True, -1, 0, 1.5, 10**30, float("inf"), "", "x", [], {}, [1], {"a": 1}, [{"role": "user"}]]
    keys = ["model", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logit_bias",
            "session_id", "delta_mem", "stream_options", "max_completion_tokens", "prompt", "ignore_eos"]
    for _ in range(150):
        junk = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(1, 6))}
        raw = json.dumps(junk).encode()  # Infinity included: Python's json accepts it, so must we
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/sessions"):
            r = alice.post(path, content=raw, headers={"content-type": "application/json"})
            assert r.status_code < 500, (path, junk, r.text)
            if r.status_code >= 400:
                assert_openai_error(r, r.status_code)


def test_client_errors_carry_no_server_paths():
    from server.errors import APIError, redact_paths

    err = APIError(503, "could not persist the session state: [Errno 28] No space left: '/srv/state/ab/cd.json'",
                   code="persist_failed")
    assert err.body()["error"]["message"] == "could not persist the session state: [Errno 28] No space left: '<path>'"
    for kept in ("as returned by GET /v1/sessions/{id}/state", "top_p must be in (0, 1]", "a/b ratio 1/2",
                 "http://127.0.0.1:8000/v1/models"):
        assert redact_paths(kept) == kept


def test_error_messages_say_what_is_wrong(alice):
    def post(raw: bytes, headers: dict | None = None) -> httpx.Response:
        return alice.post("/v1/chat/completions", content=raw,
                          headers={"content-type": "application/json"} if headers is None else headers)

    surrogate = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 2}'
    err = assert_openai_error(post(surrogate), 400, param="messages.0.content")
    assert "surrogate" in err["message"]
    stop = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\udc00"]}'
    assert_openai_error(post(stop), 400, param="stop.0")
    nan = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    err = assert_openai_error(post(nan), 400, param="temperature")
    assert "finite" in err["message"]
    good = json.dumps(body()).encode()
    for headers in ({}, {"content-type": "text/plain"}):
        err = assert_openai_error(post(good, headers), 400)
        assert "application/json" in err["message"], err
