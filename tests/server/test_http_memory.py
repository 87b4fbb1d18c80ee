"""Session semantics over HTTP: memory mode against a DeltaMemModel replay, the three ways
of sending a conversation, read-only turns, reset, fork, export/import and the session API."""

from __future__ import annotations

import time

import pytest
import torch

from delta_mem_vllm.state import Snapshot, export_document, import_document
from delta_mem_vllm.testing.tiny import build_tokenizer
from server.session_record import EMPTY_DIGEST, extend_digest
from tests.server.conftest import (
    ENGINES,
    ThreadServer,
    app_kwargs_for,
    assert_openai_error,
    chat,
    export_state,
    make_settings,
    reference_turn,
)

SYS = {"role": "system", "content": "You are a tiny model."}
TURNS = ["My name is Ada.", "I like green tea.", "What is my name?"]
A_ID = str(build_tokenizer().convert_tokens_to_ids("a"))


@pytest.fixture(scope="module", params=ENGINES)
def server(request, tiny_paths, tmp_path_factory):
    # small pools: states are evicted to the host and to disk and restored during these tests
    settings = make_settings(tiny_paths, tmp_path_factory.mktemp("state"), engine=request.param, device_pool_size=2,
                             host_pool_size=2)
    srv = ThreadServer(settings, **app_kwargs_for(request, request.param)).start()
    yield srv
    srv.stop()


def render(tok, msgs, gen: bool) -> list[int]:
    return tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False)


def test_memory_mode_state_equals_deltamem_replay(http, dm_tok):
    """Only the new turn is sent; the stored state equals DeltaMemModel run over the per-turn
    sequences (context + pending + new, write_start = len(context), positions from 0) with the
    state carried between turns."""
    dm, tok = dm_tok
    sid = "memref"
    state, pending, written = torch.zeros(dm.state_shape), [], []
    sys_len = len(render(tok, [SYS], False))
    for i, text in enumerate(TURNS):
        msgs = [SYS, {"role": "user", "content": text}]
        r = chat(http, msgs, sid, max_tokens=6)
        full = render(tok, msgs, True)
        ctx = 0 if i == 0 else sys_len          # the system message is context-only once written
        expected = full[:ctx] + pending + full[ctx:]
        assert r["prompt_token_ids"] == expected
        assert r["delta_mem"]["context_tokens"] == ctx and r["delta_mem"]["pending_tokens"] == len(pending)
        gen = r["choices"][0]["token_ids"]
        ref_gen, state = reference_turn(dm, tok, expected, state, ctx, len(gen))
        assert ref_gen == gen
        written += expected[ctx:] + gen[:-1]
        pending = gen[-1:]
        assert r["delta_mem"]["written_tokens"] == len(expected) - ctx + len(gen) - 1
    torch.testing.assert_close(export_state(http, sid), state, atol=1e-5, rtol=0)
    s = http.get(f"/v1/sessions/{sid}").json()
    assert s["version"] == 3 and s["turns"] == 3 and s["pending_tokens"] == 1
    assert s["written_token_ids"] == written and s["tokens_written"] == len(written)
    assert s["written_digest"] == extend_digest(EMPTY_DIGEST, written)


def converse(http, mode: str, sid: str) -> tuple[dict, torch.Tensor]:
    history: list[dict] = []
    for text in TURNS:
        user = {"role": "user", "content": text}
        msgs = {"memory": [SYS, user], "whole": [SYS, *history, user], "last2": [SYS, *history[-2:], user]}[mode]
        r = chat(http, msgs, sid, max_tokens=3, logit_bias={A_ID: 100})   # same replies in every mode
        reply = r["choices"][0]["message"]["content"]
        assert reply == "aaa"
        history += [user, {"role": "assistant", "content": reply}]
    return http.get(f"/v1/sessions/{sid}").json(), export_state(http, sid)


def test_memory_whole_history_and_last_two_turns_write_the_same_stream(http):
    mem, s_mem = converse(http, "memory", "mode-memory")
    whole, s_whole = converse(http, "whole", "mode-whole")
    last2, s_last2 = converse(http, "last2", "mode-last2")
    assert mem["written_token_ids"] == whole["written_token_ids"] == last2["written_token_ids"]
    assert mem["written_digest"] == whole["written_digest"] == last2["written_digest"]
    assert mem["tokens_written"] == whole["tokens_written"] > 0
    # layer 0 sees only the written tokens themselves: identical states
    torch.testing.assert_close(s_whole[0], s_mem[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(s_last2[0], s_mem[0], atol=1e-5, rtol=0)
    # later layers read the (read-only) context, so they legitimately differ
    assert (s_whole[1] - s_mem[1]).abs().max() > 1e-4


def test_read_only_turn_leaves_state_bit_unchanged(http):
    sid = "readonly"
    chat(http, [{"role": "user", "content": "remember 42"}], sid)
    before, info = export_state(http, sid), http.get(f"/v1/sessions/{sid}").json()
    r = chat(http, [{"role": "user", "content": "what number?"}], sid, delta_mem={"write": False})
    assert r["delta_mem"]["committed"] is False and r["delta_mem"]["written_tokens"] == 0
    assert torch.equal(export_state(http, sid), before)
    after = http.get(f"/v1/sessions/{sid}").json()
    for key in ("version", "turns", "written_digest", "tokens_written", "pending_tokens"):
        assert after[key] == info[key]


def test_reset_turn_and_reset_route(http):
    sid, fresh = "resetme", "reset-fresh"
    for text in TURNS[:2]:
        chat(http, [{"role": "user", "content": text}], sid)
    msgs = [{"role": "user", "content": TURNS[2]}]
    r = chat(http, msgs, sid, delta_mem={"reset": True})
    assert r["delta_mem"]["pending_tokens"] == 0 and r["delta_mem"]["context_tokens"] == 0
    chat(http, msgs, fresh)
    assert torch.equal(export_state(http, sid), export_state(http, fresh))
    a, b = http.get(f"/v1/sessions/{sid}").json(), http.get(f"/v1/sessions/{fresh}").json()
    assert a["written_digest"] == b["written_digest"] and a["version"] == 3
    r = http.post(f"/v1/sessions/{sid}/reset")
    assert r.status_code == 200
    s = r.json()
    assert s["version"] == 4 and s["tokens_written"] == 0 and s["pending_tokens"] == 0
    assert s["state_norms"] == [0.0] * len(s["state_norms"])
    assert not export_state(http, sid).any()


def test_fork(http):
    src = "fork-src"
    chat(http, [{"role": "user", "content": TURNS[0]}], src)
    before = export_state(http, src)
    r = http.post(f"/v1/sessions/{src}/fork", json={"id": "fork-dst", "metadata": {"branch": "b"}})
    assert r.status_code == 200, r.text
    dst = r.json()
    assert dst["id"] == "fork-dst" and dst["object"] == "session" and dst["metadata"] == {"branch": "b"}
    assert torch.equal(export_state(http, "fork-dst"), before)
    nxt = [{"role": "user", "content": TURNS[1]}]
    a = chat(http, nxt, "fork-dst")
    assert torch.equal(export_state(http, src), before)      # the fork's turn does not touch the source
    b = chat(http, nxt, src)
    assert a["prompt_token_ids"] == b["prompt_token_ids"]    # pending tokens were forked too
    assert torch.equal(export_state(http, src), export_state(http, "fork-dst"))
    auto = http.post(f"/v1/sessions/{src}/fork").json()
    assert auto["id"].startswith("sess_") and auto["id"] != src
    assert_openai_error(http.post(f"/v1/sessions/{src}/fork", json={"id": "fork-dst"}), 409, "session_exists")
    assert_openai_error(http.post("/v1/sessions/nope/fork"), 404)


def test_export_import(http, server):
    src = "exp-src"
    chat(http, [{"role": "user", "content": TURNS[0]}], src)
    doc = http.get(f"/v1/sessions/{src}/state").json()
    assert doc["object"] == "session.state" and doc["manifest"]["shape"] == list(server.ctx.engine.state_shape)
    r = http.put("/v1/sessions/exp-dst/state", json=doc)
    assert r.status_code == 200, r.text
    assert torch.equal(export_state(http, "exp-dst"), export_state(http, src))
    nxt = [{"role": "user", "content": TURNS[1]}]
    assert chat(http, nxt, src)["choices"] == chat(http, nxt, "exp-dst")["choices"]
    assert torch.equal(export_state(http, "exp-dst"), export_state(http, src))
    # another adapter's state: 409; a damaged document: 400
    snap = import_document(doc)
    foreign = export_document(Snapshot(snap.state, snap.record, "0" * 64, snap.layer_names))
    assert_openai_error(http.put("/v1/sessions/exp-dst/state", json=foreign), 409, "adapter_mismatch")
    damaged = {**doc, "data": doc["data"][:-12] + "A" * 12}
    assert_openai_error(http.put("/v1/sessions/exp-dst/state", json=damaged), 400, "invalid_state")
    assert_openai_error(http.put("/v1/sessions/exp-dst/state", json=[1, 2]), 400)


def test_crafted_imports_are_refused_whole(http, server):
    """A crafted document is a 400 and changes nothing; the session keeps serving turns."""
    src = "craft-src"
    chat(http, [{"role": "user", "content": TURNS[0]}], src)
    doc = http.get(f"/v1/sessions/{src}/state").json()
    snap = import_document(doc)
    vocab = len(server.ctx.engine.tokenizer)

    def crafted(state=None, **record):
        return export_document(Snapshot(snap.state if state is None else state, {**snap.record, **record},
                                        snap.adapter_fingerprint, snap.layer_names, snap.model_fingerprint))

    bad = [crafted(pending_token_ids=[vocab + 5]), crafted(pending_token_ids=["7"]), crafted(tokens_written=-1),
           crafted(turns=1.5), crafted(written_digest="xyz"), crafted(message_log=["user:" + "0" * 5]),
           crafted(pending_token_ids=list(range(100))), crafted(state=snap.state * 1e9),
           crafted(written_token_ids=[1, 2, 3])]
    before = export_state(http, src)
    version = http.get(f"/v1/sessions/{src}").json()["version"]
    for document in bad:
        err = assert_openai_error(http.put(f"/v1/sessions/{src}/state", json=document), 400, "invalid_state")
        assert "/" not in err["message"].replace("/v1/", "")   # no server paths in client errors
    assert torch.equal(export_state(http, src), before)
    assert http.get(f"/v1/sessions/{src}").json()["version"] == version
    assert chat(http, [{"role": "user", "content": TURNS[1]}], src)["choices"][0]["finish_reason"] == "length"
    # the document as exported imports, and exporting it again gives the same bytes
    assert http.put("/v1/sessions/craft-dst/state", json=doc).status_code == 200
    again = http.get("/v1/sessions/craft-dst/state").json()
    assert again["data"] == doc["data"] and again["manifest"]["sha256"] == doc["manifest"]["sha256"]
    assert http.get("/v1/sessions/craft-dst/state").content == http.get("/v1/sessions/craft-dst/state").content


def test_session_api_objects_listing_delete_and_ttl(http, server):
    r = http.post("/v1/sessions", json={"id": "api-1", "ttl": 3600, "metadata": {"user": "ada"}})
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["object"] == "session" and s["id"] == "api-1" and s["version"] == 0 and s["turns"] == 0
    assert s["metadata"] == {"user": "ada"} and s["ttl"] == 3600 and s["expires_at"] >= s["created_at"] + 3600
    assert s["adapter_fingerprint"] == server.ctx.engine.adapter_fingerprint
    assert s["residency"] in ("device", "host", "persistent")
    assert_openai_error(http.post("/v1/sessions", json={"id": "api-1"}), 409, "session_exists")
    auto = http.post("/v1/sessions").json()
    assert auto["id"].startswith("sess_")
    chat(http, [{"role": "user", "content": "hi"}], "api-1")
    got = http.get("/v1/sessions/api-1").json()
    assert got["turns"] == 1 and got["version"] == 1 and got["tokens_written"] > 0
    assert len(got["state_norms"]) == server.ctx.engine.state_shape[0] and max(got["state_norms"]) > 0
    listing = http.get("/v1/sessions", params={"limit": 1000}).json()
    assert listing["object"] == "list" and {"api-1", auto["id"]} <= {x["id"] for x in listing["data"]}
    page = http.get("/v1/sessions", params={"limit": 2}).json()
    assert len(page["data"]) == 2 and page["has_more"]
    nxt = http.get("/v1/sessions", params={"limit": 2, "after": page["last_id"]}).json()
    assert not {x["id"] for x in nxt["data"]} & {x["id"] for x in page["data"]}
    # paging goes on when the cursor's session is deleted meanwhile: nothing is skipped
    for i in range(5):
        assert http.post("/v1/sessions", json={"id": f"page-{i}"}).status_code == 200
    everything = [x["id"] for x in http.get("/v1/sessions", params={"limit": 1000}).json()["data"]]
    assert everything == sorted(everything)
    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = http.get("/v1/sessions", params=params).json()
        seen += [x["id"] for x in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
        if after == "page-1":
            assert http.delete("/v1/sessions/page-1").status_code == 200
    assert seen == everything
    d = http.delete("/v1/sessions/api-1")
    assert d.status_code == 200 and d.json() == {"id": "api-1", "object": "session.deleted", "deleted": True}
    assert_openai_error(http.get("/v1/sessions/api-1"), 404, "session_not_found")
    assert_openai_error(http.get("/v1/sessions/api-1/state"), 404)
    assert "api-1" not in {x["id"] for x in http.get("/v1/sessions", params={"limit": 1000}).json()["data"]}
    http.post("/v1/sessions", json={"id": "short-lived", "ttl": 0.5})
    time.sleep(0.8)
    assert_openai_error(http.get("/v1/sessions/short-lived"), 404)


def test_completions_with_a_session(http):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0, "session_id": "cmpl",
            "return_token_ids": True, "ignore_eos": True}
    first = http.post("/v1/completions", json=body).json()
    second = http.post("/v1/completions", json={**body, "prompt": "and then"}).json()
    assert second["prompt_token_ids"][0] == first["choices"][0]["token_ids"][-1]   # pending token first
    assert second["delta_mem"]["version"] == 2 and second["delta_mem"]["written_tokens"] == len(
        second["prompt_token_ids"]) + 2
    s = http.get("/v1/sessions/cmpl").json()
    assert s["written_token_ids"] == first["prompt_token_ids"] + first["choices"][0]["token_ids"][:-1] + \
        second["prompt_token_ids"] + second["choices"][0]["token_ids"][:-1]


@torch.inference_mode()
def test_stop_string_turn_writes_exactly_what_was_shown(server, http, dm_tok):
    """A turn ended by a stop string writes its prompt and the shown tokens but the last, on both
    engines (vLLM runs past the stop until the abort lands: its state is then recomputed)."""
    dm, _ = dm_tok
    sid, state = "stopper", torch.zeros(dm.state_shape)
    replays = server.ctx.engine.health().get("stop_replays", 0)
    for turn in range(3):
        r = chat(http, [{"role": "user", "content": f"turn {turn}"}], sid, max_tokens=200, ignore_eos=True,
                 stop=["aaa"], logit_bias={A_ID: 100})
        gen = r["choices"][0]["token_ids"]
        assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["message"]["content"] == ""
        assert len(gen) == 3 and r["delta_mem"]["written_tokens"] == len(r["prompt_token_ids"]) + 2
        state = dm(torch.tensor([r["prompt_token_ids"] + gen[:-1]]), state=state[None]).state[0]
    torch.testing.assert_close(export_state(http, sid), state, atol=1e-5, rtol=0)
    assert http.get(f"/v1/sessions/{sid}").json()["pending_tokens"] == 1
    if server.settings.engine == "vllm":
        assert server.ctx.engine.health()["stop_replays"] > replays
