"""P1/P2: adapter files in the reference and safetensors forms, fingerprints, state files, errors."""

from __future__ import annotations

import json

import pytest
import torch

from delta_mem_vllm.adapter import (REFERENCE_WEIGHTS_FILE, SAFETENSORS_WEIGHTS_FILE, AdapterError, load_adapter,
                                    save_adapter)
from delta_mem_vllm.config import DeltaMemConfig
from delta_mem_vllm.hf import DeltaMemModel
from delta_mem_vllm.state import StateFormatError, StateMismatchError
from delta_mem_vllm.testing.tiny import build_tiny_model, save_tiny_checkpoint

from .helpers import make_dm, rand_ids


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_p1_save_load_into_a_differently_initialised_model(tmp_path, fmt: str) -> None:
    dm = make_dm("qwen3", "qkvo_heads", seed=0)
    save_adapter(dm.adapter(), tmp_path, formats=(fmt,))
    config = json.loads((tmp_path / "delta_mem_config.json").read_text())
    assert len(config) == 49
    if fmt == "pt":
        raw = torch.load(tmp_path / REFERENCE_WEIGHTS_FILE, weights_only=True)
        assert "model.layers.0.self_attn.memory_q_proj" in raw and "model.layers.1.self_attn.beta_bias" in raw
        assert len(raw) == 2 * 9            # 9 tensors per layer, inactive heads included
    other = make_dm("qwen3", "qkvo_heads", seed=0)
    with torch.no_grad():
        for p in other.layers.parameters():
            p.mul_(-0.5)
    adapter = load_adapter(tmp_path)
    other.load_adapter_weights(adapter)
    ids = rand_ids(1, 10)
    with torch.no_grad():
        assert torch.equal(other(ids).logits, dm(ids).logits)
    assert other.adapter_fingerprint == dm.adapter_fingerprint


def test_fingerprint_is_format_independent_and_content_sensitive(tmp_path) -> None:
    dm = make_dm("llama")
    save_adapter(dm.adapter(), tmp_path / "a", formats=("pt",))
    save_adapter(dm.adapter(), tmp_path / "b", formats=("safetensors",))
    fa, fb = load_adapter(tmp_path / "a").fingerprint, load_adapter(tmp_path / "b").fingerprint
    assert fa == fb == dm.adapter().fingerprint
    changed = dm.adapter()
    changed.tensors["model.layers.0.self_attn.beta_bias"][0] += 1e-3
    assert changed.fingerprint != fa


def test_from_pretrained_with_reference_adapter_directory(tmp_path) -> None:
    save_tiny_checkpoint(tmp_path / "model", "qwen3")
    dm = make_dm("qwen3")
    save_adapter(dm.adapter(), tmp_path / "adapter", formats=("pt",))
    loaded = DeltaMemModel.from_pretrained(tmp_path / "model", tmp_path / "adapter", attn_implementation="eager")
    ids = rand_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, dm(ids).logits)


def test_adapter_errors_are_clear(tmp_path) -> None:
    dm = make_dm("qwen3")
    adapter = dm.adapter()
    missing = dict(adapter.tensors)
    missing.pop("model.layers.1.self_attn.delta_o_proj")
    with pytest.raises(AdapterError, match="missing.*layers.1.self_attn.delta_o_proj"):
        make_dm("qwen3").load_adapter_weights(type(adapter)(adapter.config, missing))
    wrong = dict(adapter.tensors)
    wrong["model.layers.0.self_attn.memory_q_proj"] = torch.zeros(8, 99)
    with pytest.raises(AdapterError, match=r"memory_q_proj: shape \(8, 99\)"):
        make_dm("qwen3").load_adapter_weights(type(adapter)(adapter.config, wrong))
    bigger = DeltaMemModel(build_tiny_model("qwen3", num_hidden_layers=3), adapter.config)
    with pytest.raises(AdapterError, match="missing.*layers.2"):
        bigger.load_adapter_weights(adapter)
    with pytest.raises(AdapterError, match="config differs"):
        DeltaMemModel(build_tiny_model("qwen3"), DeltaMemConfig(rank=4)).load_adapter_weights(adapter)
    (tmp_path / "pickle").mkdir()
    DeltaMemConfig().save(tmp_path / "pickle")
    torch.save({"w": torch.zeros(1), "evil": object()}, tmp_path / "pickle" / REFERENCE_WEIGHTS_FILE)
    with pytest.raises(AdapterError, match="tensors-only"):
        load_adapter(tmp_path / "pickle")
    (tmp_path / "broken").mkdir()
    DeltaMemConfig().save(tmp_path / "broken")
    (tmp_path / "broken" / SAFETENSORS_WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="unreadable"):
        load_adapter(tmp_path / "broken")
    with pytest.raises(AdapterError, match="not found"):
        load_adapter(tmp_path / "nowhere")


def test_p2_state_save_load_continue_exactly(tmp_path) -> None:
    dm = make_dm("qwen3", "state_heads_4")
    ids = rand_ids(1, 16, seed=2)
    with torch.no_grad():
        first = dm(ids[:, :9])
        dm.save_state(tmp_path / "s", first.state[0], record={"turns": 1})
        restored = dm.load_state(tmp_path / "s")
        assert torch.equal(restored, first.state[0])
        a = dm(ids[:, 9:], state=first.state)
        b = dm(ids[:, 9:], state=restored[None])
    assert torch.equal(a.logits, b.logits) and torch.equal(a.state, b.state)
    assert "pickle" not in (tmp_path / "s" / "manifest.json").read_text()


def test_state_files_reject_damage_and_other_adapters(tmp_path) -> None:
    dm = make_dm("qwen3")
    with torch.no_grad():
        state = dm(rand_ids(1, 5)).state[0]
    dm.save_state(tmp_path / "s", state)
    other = make_dm("qwen3", seed=7)          # different adapter weights → different fingerprint
    with pytest.raises(StateMismatchError):
        other.load_state(tmp_path / "s")
    (tensor_file,) = (tmp_path / "s").glob("state-*.safetensors")
    data = bytearray(tensor_file.read_bytes())
    data[-3] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(StateFormatError):
        dm.load_state(tmp_path / "s")
    with pytest.raises(StateFormatError):
        dm.load_state(tmp_path / "missing")
