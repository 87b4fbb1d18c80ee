"""Fixtures for the server tests: a tiny offline checkpoint + adapter, real uvicorn servers on loopback
(in a thread, or as a subprocess for restart/kill tests), and reference computations."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model_dir, adapter_dir): tiny random Qwen3 + random active adapter, built offline."""
    from server.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("tiny"))


def make_settings(tiny_paths: tuple[Path, Path], state_dir: Path, **overrides: Any):
    from server.settings import Settings

    model, adapter = tiny_paths
    base = dict(model=str(model), adapter=str(adapter), state_dir=state_dir, torch_threads=1,
                record_written_tokens=True, log_level="warning", port=0, served_model_name="tiny")
    base.update(overrides)
    return Settings(**base)


class ThreadServer:
    """A real uvicorn server on a free loopback port, run in a background thread."""

    def __init__(self, settings: Any, **app_kwargs: Any) -> None:
        import uvicorn

        from server.app import create_app

        self.port = free_port()
        self.settings = settings
        self.app = create_app(settings, **app_kwargs)
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                             timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx

    def start(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ProcServer:
    """`python -m server.cli serve …` as a subprocess (SIGTERM/SIGKILL tests)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> "ProcServer":
        self._log = open(self.log_path, "ab")
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--torch-threads", "1", "--log-level", "warning", *self.args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server not ready: {self.log_path.read_text()[-2000:]}")

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self._log.close()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if hasattr(self, "_log") and not self._log.closed:
            self._log.close()


@pytest.fixture
def proc_servers() -> Iterator[list[ProcServer]]:
    """Collects subprocess servers started by a test and kills any still running at the end."""
    started: list[ProcServer] = []
    yield started
    for srv in started:
        srv.kill()


# --- helpers used by several modules ---------------------------------------------------------------
def export_state(client: httpx.Client, session_id: str, **kw: Any) -> torch.Tensor:
    from delta_mem_vllm.state import import_document

    r = client.get(f"/v1/sessions/{session_id}/state", **kw)
    assert r.status_code == 200, r.text
    return import_document(r.json()).state


def chat(client: httpx.Client, messages: list[dict], session_id: str | None = None, **body: Any) -> dict:
    payload: dict[str, Any] = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 4,
                               "return_token_ids": True, **body}
    if session_id is not None:
        payload["session_id"] = session_id
    r = client.post("/v1/chat/completions", json=payload)
    assert r.status_code == 200, r.text
    return r.json()


def assert_openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


@torch.inference_mode()
def reference_turn(dm: Any, tok: Any, prompt: list[int], state: torch.Tensor, write_start: int, n: int):
    """Greedy decode of n tokens with DeltaMemModel by hand (prompt in one call, then one token per
    call, ids >= len(tokenizer) masked as the engine does). Returns (tokens, state) where the state is
    one call over prompt + the fed tokens (all but the last) from `state` [L,h,R,R]."""
    cache, ids, gen = None, prompt, []
    st = state[None]
    for i in range(n):
        out = dm(torch.tensor([ids]), state=st, write_start=write_start if i == 0 else 0, past_key_values=cache,
                 use_cache=True)
        st, cache = out.state, out.past_key_values
        logits = out.logits[0, -1].clone()
        logits[len(tok):] = float("-inf")
        gen.append(int(logits.argmax()))
        ids = [gen[-1]]
    full = dm(torch.tensor([prompt + gen[:-1]]), state=state[None], write_start=write_start)
    return gen, full.state[0]


@pytest.fixture(scope="session")
def dm_tok(tiny_paths):
    """The reference model, loaded exactly as the server loads it."""
    from transformers import AutoTokenizer

    from delta_mem_vllm.hf import DeltaMemModel

    model, adapter = tiny_paths
    return DeltaMemModel.from_pretrained(model, adapter, attn_implementation="sdpa"), AutoTokenizer.from_pretrained(model)
