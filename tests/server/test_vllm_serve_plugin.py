"""The plugin in plain `vllm serve` (vLLM's own OpenAI server, started with the flags
`delta-mem-vllm vllm-flags` prints): every request is stateless Δ-Mem, exactly the library's
DeltaMemModel from a zero state. For operators who already run vLLM and want the model alone."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from tests.server.conftest import REPO, VLLM_TEST_SETTINGS, free_port, reference_turn, requires_vllm

pytestmark = requires_vllm


@pytest.fixture(scope="module")
def vllm_serve(tiny_paths, tmp_path_factory):
    model, adapter = tiny_paths
    printed = subprocess.run([sys.executable, "-m", "server.cli", "vllm-flags", "--model", str(model), "--adapter",
                              str(adapter)], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    command = shlex.split(printed.stdout.strip())
    assert command[:2] == ["env", "VLLM_USE_V2_MODEL_RUNNER=0"] and "--no-enable-prefix-caching" in command
    assert command[3:5] == ["-m", "vllm.entrypoints.openai.api_server"]
    port = free_port()
    extra = ["--port", str(port), "--served-model-name", "tiny", "--dtype", "float32", "--max-model-len", "512",
             "--enforce-eager", "--kv-cache-memory-bytes", str(VLLM_TEST_SETTINGS["kv_cache_memory_bytes"])]
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(command + extra, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_vllm_serve_runs_stateless_delta_mem(vllm_serve, dm_tok):
    dm, tok = dm_tok
    client = openai.OpenAI(base_url=f"{vllm_serve}/v1", api_key="unused", max_retries=0)
    prompt = tok("The quick brown fox jumps over the lazy dog.")["input_ids"]
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
    expected, _ = reference_turn(dm, tok, prompt, torch.zeros(dm.state_shape), 0, 8)
    assert reply.choices[0].model_extra["token_ids"] == expected
    # the connector reports how many tokens the (zero-initialised) state took in
    assert reply.model_extra["kv_transfer_params"] == {"deltamem_num_tokens": len(prompt) + 7}
