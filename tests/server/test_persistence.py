"""Sessions survive a restart (SIGTERM), a kill -9 during a turn loses at most that turn, and a
corrupted or mismatched state file is rejected with a clear error. Real subprocess servers."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
import torch

from delta_mem_vllm.state import FilesystemBackend, Snapshot, storage_key
from tests.server.conftest import (ENGINES, VLLM_TEST_SETTINGS, ProcServer, ThreadServer, assert_openai_error, chat,
                                 export_state, make_settings)

TURNS = [[{"role": "user", "content": t}] for t in ("I am Ada.", "I like tea.", "Who am I?")]


def stream_through_sigterm(srv: ProcServer, body: dict) -> list[str]:
    """The SSE lines of a streamed turn during which the server gets SIGTERM (after 3 lines)."""
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            it = r.iter_lines()
            lines = [next(it) for _ in range(3)]
            srv.proc.send_signal(signal.SIGTERM)
            return lines + [ln for ln in it if ln]


def engine_flags(engine: str) -> list[str]:
    flags = ["--engine", engine]
    if engine == "vllm":
        for name, value in VLLM_TEST_SETTINGS.items():
            flag = f"--{name.replace('_', '-')}"
            flags += [flag] if value is True else [flag, str(value)]
    return flags


@pytest.mark.parametrize("engine", ENGINES)
def test_restart_kill9_and_corrupted_states(engine, tiny_paths, tmp_path, proc_servers):
    model_dir, _ = tiny_paths
    state_dir = tmp_path / "state"
    args = ["--demo", "--demo-tiny", "--demo-dir", str(model_dir.parent), "--state-dir", str(state_dir),
            "--served-model-name", "tiny", "--shutdown-grace", "20", *engine_flags(engine)]

    def start(n: int) -> ProcServer:
        srv = ProcServer(args, tmp_path / f"server-{n}.log")
        proc_servers.append(srv)
        return srv.start()

    # --- run 1: two turns on A; one committed turn on C, E, F; clean SIGTERM --------------------------
    srv = start(1)
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        replies_a = [chat(http, TURNS[i], "A")["choices"] for i in range(2)]
        for sid in ("C", "E", "F"):
            chat(http, TURNS[0], sid)
        state_c = export_state(http, "C")
    assert srv.terminate() == 0
    log = (tmp_path / "server-1.log").read_text()
    assert "Traceback" not in log and "shutdown: 0 dirty state(s) persisted" in log

    # damage E's tensors on disk; give F a valid state that belongs to another adapter
    backend = FilesystemBackend(state_dir, clean_on_start=False)
    e_dir = state_dir / storage_key("", "E")[:2] / storage_key("", "E")
    (data_file,) = e_dir.glob("state-*.safetensors")
    raw = bytearray(data_file.read_bytes())
    raw[-5] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    f_snap = backend.get(storage_key("", "F"))
    backend.put(storage_key("", "F"), Snapshot(f_snap.state, f_snap.record, "f" * 64, f_snap.layer_names))

    # --- run 2: third turn on A == uninterrupted B; corrupted/mismatched rejected; kill -9 mid-turn ---
    srv = start(2)
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        a3 = chat(http, TURNS[2], "A")
        b = [chat(http, TURNS[i], "B") for i in range(3)]
        assert [r["choices"] for r in b[:2]] == replies_a and b[2]["choices"] == a3["choices"]
        assert a3["prompt_token_ids"] == b[2]["prompt_token_ids"]      # pending tokens survived the restart
        sa, sb = http.get("/v1/sessions/A").json(), http.get("/v1/sessions/B").json()
        assert sa["version"] == sb["version"] == 3 and sa["written_digest"] == sb["written_digest"]
        assert torch.equal(export_state(http, "A"), export_state(http, "B"))

        err = assert_openai_error(http.get("/v1/sessions/E"), 409, "state_corrupted")
        assert "checksum" in err["message"] and "Reset or delete" in err["message"]
        assert_openai_error(http.post("/v1/chat/completions", json={"messages": TURNS[1], "session_id": "E"}),
                            409, "state_corrupted")
        err = assert_openai_error(http.get("/v1/sessions/F"), 409, "adapter_mismatch")
        assert "fingerprint" in err["message"]
        # the listing says of each session what GET says
        listed = {s["id"]: s for s in http.get("/v1/sessions").json()["data"]}
        assert listed["E"]["state_error"]["code"] == "state_corrupted" and listed["E"]["state_error"]["status"] == 409
        assert listed["F"]["state_error"]["code"] == "adapter_mismatch"
        assert listed["A"]["state_error"] is None and http.get("/v1/sessions/A").json()["state_error"] is None
        assert http.get("/metrics").status_code == 200

        # kill -9 while C's second turn is streaming
        body = {"model": "tiny", "messages": TURNS[1], "max_tokens": 3000, "ignore_eos": True, "temperature": 0,
                "stream": True, "session_id": "C"}
        with httpx.Client(base_url=srv.url, timeout=60) as streamer:
            with streamer.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                for _ in range(5):
                    next(lines)
                srv.proc.send_signal(signal.SIGKILL)
                srv.proc.wait(timeout=60)   # tearing down a big engine process can take a while on a loaded machine

    # --- run 3: C is at its last committed turn, intact; broken sessions can be reset or deleted ----
    srv = start(3)
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        c = http.get("/v1/sessions/C").json()
        assert c["version"] == 1 and c["turns"] == 1
        assert torch.equal(export_state(http, "C"), state_c)
        assert chat(http, TURNS[1], "C")["delta_mem"]["version"] == 2
        r = http.post("/v1/sessions/E/reset")
        assert r.status_code == 200 and r.json()["tokens_written"] == 0 and r.json()["version"] == 2  # identity kept
        assert chat(http, TURNS[0], "E")["delta_mem"]["committed"]
        assert http.delete("/v1/sessions/F").status_code == 200
        assert_openai_error(http.get("/v1/sessions/F"), 404)
        ids = {s["id"] for s in http.get("/v1/sessions").json()["data"]}
        assert {"A", "B", "C", "E"} <= ids and "F" not in ids

        # SIGTERM during a streamed turn: the turn finishes within the grace period and is committed
        lines = stream_through_sigterm(srv, {**body, "session_id": "G", "max_tokens": 60})
    assert srv.proc.wait(timeout=30) == 0
    assert lines[-1] == "data: [DONE]"
    finals = [json.loads(ln[6:]) for ln in lines if ln.startswith("data: {") and '"finish_reason":"length"' in ln]
    assert len(finals) == 1 and finals[0]["delta_mem"]["committed"]
    g = FilesystemBackend(state_dir, clean_on_start=False).get(storage_key("", "G"))
    assert g.record["version"] == 1 and g.record["pending_token_ids"]
    # nothing but committed snapshots is left on disk
    for d in state_dir.glob("*/*"):
        names = sorted(p.name for p in d.iterdir())
        assert len(names) == 2 and names[0] == "manifest.json" and names[1].startswith("state-"), names
        json.loads((d / "manifest.json").read_text())


def test_a_stream_outlasting_the_grace_period_ends_with_an_error_event(tiny_paths, tmp_path, proc_servers):
    model_dir, _ = tiny_paths
    srv = ProcServer(["--demo", "--demo-tiny", "--demo-dir", str(model_dir.parent), "--state-dir", str(tmp_path / "state"),
                      "--served-model-name", "tiny", "--shutdown-grace", "1", "--engine", "torch"],
                     tmp_path / "server.log")
    proc_servers.append(srv)
    srv.start()
    lines = stream_through_sigterm(srv, {"model": "tiny", "messages": TURNS[0], "max_tokens": 4000,
                                         "ignore_eos": True, "stream": True, "session_id": "long"})
    assert srv.proc.wait(timeout=30) == 0
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == "shutting_down" and "nothing was committed" in error["message"]
    assert not any('"finish_reason":"length"' in ln for ln in lines)
    stored = FilesystemBackend(tmp_path / "state", clean_on_start=False).get(storage_key("", "long"))
    assert stored is None or (stored.record["version"] == 0 and not stored.state.any())


def test_a_storage_quota_is_a_507_that_commits_nothing(tiny_paths, tmp_path):
    """An owner whose sessions and responses take all the bytes they may: a turn that would grow them
    is a 507 and the session stays as it was; a Responses call cannot start a chain; lifting the
    limit lets both through."""
    srv = ThreadServer(make_settings(tiny_paths, tmp_path / "state")).start()
    try:
        http = httpx.Client(base_url=srv.url, timeout=120)
        user = [{"role": "user", "content": "I am Ada."}]
        assert chat(http, user, "s")["delta_mem"]["version"] == 1
        before = http.get("/v1/sessions/s").json()
        srv.ctx.sessions.max_stored_bytes_per_owner = 1
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "Hi."}],
                                                    "session_id": "s", "max_tokens": 2})
        assert_openai_error(r, 507, "storage_quota_exceeded")
        assert http.get("/v1/sessions/s").json()["revision"] == before["revision"]
        r = http.post("/v1/responses", json={"model": "tiny", "input": "Hi.", "max_output_tokens": 2})
        assert_openai_error(r, 507, "storage_quota_exceeded")
        srv.ctx.sessions.max_stored_bytes_per_owner = None
        assert chat(http, [{"role": "user", "content": "Hi."}], "s")["delta_mem"]["version"] == 2
        assert http.post("/v1/responses", json={"model": "tiny", "input": "Hi.", "max_output_tokens": 2}).status_code == 200
        http.close()
    finally:
        srv.stop()
