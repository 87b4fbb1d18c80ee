"""What a CPU start decides when the operator sets nothing: the KV cache size (never vLLM's
92%-of-the-node default, which refuses to start on a machine with anything else running) and the
dtype. The sizing arithmetic alone, the glue with the memory reading vLLM's check uses patched to
the machine the issue was found on, and real starts: one next to a process holding most of the
memory, one that cannot fit and says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server.engine.kv_budget import GiB, MiB, KvCacheWontFit, KvShape, plan_cpu_kv_cache

from .conftest import REPO, HAS_VLLM, ProcServer, requires_vllm

# SmolLM2-135M in bf16: 30 layers x 3 KV heads x 64 dims x K and V x 2 bytes
SMOLLM2_BF16 = KvShape(bytes_per_token=2 * 30 * 3 * 64 * 2, block_tokens=128)


def test_one_request_costs_its_blocks_and_a_state_slot():
    assert SMOLLM2_BF16.request_bytes(8192) == (64 + 1) * 128 * 23040
    assert SMOLLM2_BF16.request_bytes(1) == 2 * 128 * 23040


def test_a_quarter_of_what_is_available_when_the_configuration_wants_more():
    # the machine the issue was found on: 12.82 of 14.34 GiB available on its one NUMA node
    available = int(12.82 * GiB)
    plan = plan_cpu_kv_cache(SMOLLM2_BF16, max_model_len=8192, max_num_seqs=128, available=available,
                             weights=270 * MiB)
    assert plan.bytes == int(0.25 * available) // MiB * MiB
    assert plan.bytes // SMOLLM2_BF16.request_bytes(8192) == 17
    assert "3.20 GiB" in plan.reason and "25% of the 12.82 GiB available" in plan.reason
    assert "--kv-cache-memory-bytes" in plan.reason


def test_what_the_configuration_needs_when_that_is_less():
    plan = plan_cpu_kv_cache(SMOLLM2_BF16, max_model_len=512, max_num_seqs=4, available=16 * GiB, weights=0)
    assert plan.bytes == 4 * SMOLLM2_BF16.request_bytes(512)
    assert "all 4 requests" in plan.reason


def test_never_below_one_full_length_request():
    # a quarter of 1.4 GiB is less than one 8192-token request in fp32 (0.357 GiB): one request it is
    fp32 = KvShape(bytes_per_token=2 * 30 * 3 * 64 * 4, block_tokens=128)
    plan = plan_cpu_kv_cache(fp32, max_model_len=8192, max_num_seqs=128, available=int(1.4 * GiB), weights=0)
    assert plan.bytes == fp32.request_bytes(8192)


def test_a_start_that_cannot_fit_says_what_it_needs_what_is_free_and_which_flag():
    qwen3_4b = KvShape(bytes_per_token=2 * 36 * 8 * 128 * 2, block_tokens=128)
    with pytest.raises(KvCacheWontFit) as err:
        plan_cpu_kv_cache(qwen3_4b, max_model_len=262144, max_num_seqs=128, available=12 * GiB, weights=8 * GiB)
    text = str(err.value)
    assert "\n" not in text
    assert "36.02 GiB" in text and "12.00 GiB of memory is available" in text and "--max-model-len" in text


# --- the glue: the same inputs vLLM's check reads, patched ---------------------------------------
@requires_vllm
def test_the_cpu_start_is_sized_from_the_memory_vllm_reads(tiny_paths, monkeypatch, caplog):
    import delta_mem_vllm.vllm.compat as compat
    from server.engine.vllm_cpu_defaults import settle_cpu_defaults
    from server.settings import Settings

    model, adapter = tiny_paths
    monkeypatch.setattr(compat, "cpu_memory", lambda: (int(12.82 * GiB), int(14.34 * GiB)))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    settings = Settings(model=str(model), adapter=str(adapter), engine="vllm", max_model_len=512, dtype="float32")
    with caplog.at_level("INFO", logger="deltamem.engine"):
        settled = settle_cpu_defaults(settings)
    assert settled.max_num_seqs == 128   # vLLM's default, now written down
    assert settled.kv_cache_memory_bytes is not None and settled.kv_cache_memory_bytes < 0.25 * 12.82 * GiB
    assert any("KV cache" in r.message and "all 128 requests" in r.message for r in caplog.records)
    # what the operator set is never second-guessed
    for given in (dict(kv_cache_memory_bytes=64 << 20), dict(gpu_memory_utilization=0.3)):
        kept = settle_cpu_defaults(settings.model_copy(update=given))
        assert kept.kv_cache_memory_bytes == given.get("kv_cache_memory_bytes")
        assert kept.max_num_seqs is None
    monkeypatch.setattr(compat, "cpu_memory", lambda: (200 * MiB, int(14.34 * GiB)))
    from server.engine.base import EngineError

    with pytest.raises(EngineError, match="only 0.20 GiB of memory is available"):
        settle_cpu_defaults(settings)


@requires_vllm
def test_a_gpu_keeps_vllms_own_defaults(tiny_paths, monkeypatch):
    import torch

    from server.engine.vllm_cpu_defaults import settle_cpu_defaults
    from server.engine.vllm_engine import vllm_engine_settings
    from server.settings import Settings

    model, adapter = tiny_paths
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings = Settings(model=str(model), adapter=str(adapter), engine="vllm")
    assert settle_cpu_defaults(settings) == settings
    engine = vllm_engine_settings(settings)
    assert engine["dtype"] == "auto" and "kv_cache_memory_bytes" not in engine
    assert "gpu_memory_utilization" not in engine and "max_num_seqs" not in engine


def test_dtype_auto_is_bf16_exactly_where_the_cpu_has_it(monkeypatch):
    import server.engine.hardware as hw

    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: True)
    assert hw.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    assert hw.resolve_dtype("auto", "cpu") == "float32"
    assert hw.resolve_dtype("auto", "cuda:0") == "bfloat16"
    assert hw.resolve_dtype("float32", "cuda") == "float32"


def test_native_bf16_is_what_vllms_cpu_backend_detects():
    import platform

    import torch

    from server.engine.hardware import cpu_has_native_bf16

    if platform.machine() != "x86_64":
        pytest.skip("the x86 flags")
    flags = Path("/proc/cpuinfo").read_text().split()
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert cpu_has_native_bf16() == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# --- real starts -----------------------------------------------------------------------------------
HOLD = """
import sys, time
from delta_mem_vllm.vllm.compat import cpu_memory
available, total = cpu_memory()
block = bytearray(int(available * float(sys.argv[1])))
for i in range(0, len(block), 4096):
    block[i] = 1
print(available, total, len(block), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(not HAS_VLLM and os.environ.get("DELTAMEM_REQUIRE_VLLM") != "1", reason="vLLM not installed")
def test_the_default_start_works_next_to_a_process_holding_most_of_the_memory(tiny_paths, tmp_path, proc_servers):
    """vLLM's default wants 92% of the node and refuses to start once other programs hold more than 8% of it;
    here another process holds 60% of what was available, and the server starts with no memory flag."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, "0.6"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        holder.stdout.readline()   # holding
        model, adapter = tiny_paths
        srv = ProcServer(["--model", str(model), "--adapter", str(adapter), "--engine", "vllm", "--enforce-eager",
                          "--log-level", "info", "--state-dir", str(tmp_path / "state")], tmp_path / "server.log")
        proc_servers.append(srv)
        srv.start(timeout=300)
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hello", "max_tokens": 4, "temperature": 0},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        log = (tmp_path / "server.log").read_text()
        assert any("KV cache" in x and "on the CPU" in x for x in log.splitlines()), log[-2000:]   # the choice, logged
        assert "Explicitly set" in log   # vLLM took our figure, not its 92% default
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(not HAS_VLLM and os.environ.get("DELTAMEM_REQUIRE_VLLM") != "1", reason="vLLM not installed")
def test_a_start_that_cannot_fit_exits_with_one_line(tiny_paths, tmp_path):
    """A context no machine can hold (the memory side is covered above with vLLM's reading patched):
    one line on stderr, exit 2, before any engine process starts."""
    model, adapter = tiny_paths
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--adapter", str(adapter),
                          "--engine", "vllm", "--max-model-len", str(1 << 40), "--dtype", "float32"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    errors = [x for x in run.stderr.splitlines() if x.startswith("delta-mem-vllm: error:")]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "the KV cache needs at least" in errors[0] and "--max-model-len" in errors[0]
    assert time.monotonic() - t0 < 60   # decided before any engine process starts
