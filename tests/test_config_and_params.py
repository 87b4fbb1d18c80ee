"""C1–C4, C6 and F1–F5: the config file, parameter layout and initialisation, and one layer's math."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from delta_mem_vllm.config import ARCHIVED_DEFAULTS, DeltaMemConfig, DeltaMemConfigError
from delta_mem_vllm.hf import DeltaMemModel
from delta_mem_vllm.ops.memory import DeltaMemLayer
from delta_mem_vllm.testing.adapters import randomize_
from delta_mem_vllm.testing.tiny import build_tiny_model


def test_c1_defaults() -> None:
    c = DeltaMemConfig()
    assert (c.rank, c.alpha, c.beta_bias_init, c.normalize_qk, c.couple_lambda) == (8, 16.0, -1.5, True, True)
    assert (c.state_update_mode, c.rankwise_gates, c.output_init, c.base_slice_ref_width) == ("standard", True, "zero", 8)
    assert (c.online_gain, c.num_state_heads, c.memory_write_granularity) == (0.05, 1, "token")
    assert (c.target_modules, c.target_layers, c.delta_heads) == (("self_attn",), (), ("q", "k", "v", "o"))
    assert (c.delta_o_rmsnorm, c.trainable_delta_scale, c.delta_scale_init, c.delta_scale_max) == (False, False, 1.0, 2.0)
    assert c.delta_scale_granularity == "layer" and c.scale == 2.0


def test_config_file_has_all_49_keys_and_round_trips(tmp_path) -> None:
    c = DeltaMemConfig(delta_heads="Q, o,q", target_layers=[0, 1], num_state_heads=4)
    assert c.delta_heads == ("q", "o")
    path = c.save(tmp_path)
    data = json.loads(path.read_text())
    assert len(data) == 49 and data["delta_heads"] == ["q", "o"] and data["target_layers"] == [0, 1]
    assert DeltaMemConfig.load(tmp_path) == c
    assert DeltaMemConfig(delta_heads="none").delta_heads == ()


@pytest.mark.parametrize("key", sorted(ARCHIVED_DEFAULTS))
def test_c2_archived_options_rejected_naming_the_key(key: str) -> None:
    default = ARCHIVED_DEFAULTS[key]
    bad = {int: 3, bool: True, str: "other", tuple: (1,)}[type(default)]
    with pytest.raises(DeltaMemConfigError, match=key):
        DeltaMemConfig(**{key: bad})


@pytest.mark.parametrize("kwargs,key", [
    ({"state_update_mode": "bogus"}, "state_update_mode"),
    ({"memory_write_granularity": "message_proposals"}, "memory_write_granularity"),
    ({"num_state_heads": 0}, "num_state_heads"),
    ({"base_slice_ref_width": 0}, "base_slice_ref_width"),
    ({"delta_scale_init": 2.0}, "delta_scale_init"),
    ({"delta_heads": "q,x"}, "delta_heads"),
    ({"output_init": "ones"}, "output_init"),
    ({"latent_memory_slots": 0}, "latent_memory_slots"),
])
def test_c2_invalid_values(kwargs: dict, key: str) -> None:
    with pytest.raises(DeltaMemConfigError, match=key):
        DeltaMemConfig(**kwargs)


def test_unknown_key_in_file_is_named(tmp_path) -> None:
    data = DeltaMemConfig().to_dict() | {"synthetic_kv": True}
    (tmp_path / "delta_mem_config.json").write_text(json.dumps(data))
    with pytest.raises(DeltaMemConfigError, match="synthetic_kv"):
        DeltaMemConfig.load(tmp_path)


@pytest.mark.parametrize("rankwise,heads", [(True, 1), (False, 1), (True, 4), (False, 4)])
def test_c3_parameter_shapes(rankwise: bool, heads: int) -> None:
    cfg = DeltaMemConfig(rankwise_gates=rankwise, num_state_heads=heads, couple_lambda=False)
    layer = DeltaMemLayer(cfg, hidden_size=64, q_out=64, k_out=32, v_out=32, o_out=64)
    D, G = 8 * heads, (8 * heads if rankwise else heads)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"memory_q_proj": (D, 64), "memory_k_proj": (D, 64), "memory_v_proj": (D, 64),
                      "delta_q_proj": (64, D), "delta_k_proj": (32, D), "delta_v_proj": (32, D),
                      "delta_o_proj": (64, D), "beta_proj": (G, 64), "beta_bias": (G,),
                      "lambda_proj": (G, 64), "lambda_bias": (G,)}
    coupled = DeltaMemLayer(DeltaMemConfig(), 64, 64, 32, 32, 64)
    assert not hasattr(coupled, "lambda_proj")


def test_c4_initialisation() -> None:
    torch.manual_seed(0)
    base = {h: torch.randn(out, 64) for h, out in (("q", 64), ("k", 32), ("v", 32), ("o", 64))}
    cfg = DeltaMemConfig(output_init="base_slice_fixed", rank=16, delta_heads=("q", "o"), couple_lambda=False)
    layer = DeltaMemLayer(cfg, 64, 64, 32, 32, 64)
    layer.reset_parameters(base)
    bound = 1 / math.sqrt(64)
    assert layer.memory_q_proj.abs().max() <= bound and layer.memory_q_proj.std() > bound / 3
    assert torch.count_nonzero(layer.beta_proj) == 0 and torch.all(layer.beta_bias == -1.5)
    assert torch.all(layer.lambda_bias == 1.5) and torch.count_nonzero(layer.lambda_proj) == 0
    assert torch.count_nonzero(layer.delta_k_proj) == 0 and torch.count_nonzero(layer.delta_v_proj) == 0
    expected = F.normalize(base["q"][:, :8], dim=0, eps=1e-6) * 0.05
    assert torch.allclose(layer.delta_q_proj[:, :8], expected) and torch.count_nonzero(layer.delta_q_proj[:, 8:]) == 0
    plain = DeltaMemLayer(cfg.replace(output_init="base_slice"), 64, 64, 32, 32, 64)
    plain.reset_parameters(base)
    assert torch.count_nonzero(plain.delta_o_proj.abs().sum(0)) == 16   # base_slice uses R columns


def test_c6_released_adapter_size_on_qwen3_4b_dims() -> None:
    cfg = DeltaMemConfig(delta_heads=("q", "o"), output_init="base_slice_fixed")
    layer = DeltaMemLayer(cfg, hidden_size=2560, q_out=4096, k_out=1024, v_out=1024, o_out=2560)
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    saved = sum(p.numel() for p in layer.parameters())
    assert trainable == 135_176 and trainable * 36 == 4_866_336 and saved == 151_560


def test_c6_only_delta_mem_parameters_train() -> None:
    dm = DeltaMemModel(build_tiny_model("qwen3"), DeltaMemConfig(delta_heads=("q", "o")))
    trainable = {n for n, p in dm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("layers.") for n in trainable)   # backbone is under "model."
    assert not any(n.endswith(("delta_k_proj", "delta_v_proj")) for n in trainable)


def _layer(**kw) -> DeltaMemLayer:
    cfg = DeltaMemConfig(**kw)
    layer = DeltaMemLayer(cfg, 32, 32, 16, 16, 32)
    layer.reset_parameters({h: torch.randn(o, 32) for h, o in (("q", 32), ("k", 16), ("v", 16), ("o", 32))})

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([layer])
    randomize_(Holder(), seed=1)
    return layer


def test_f1_memory_projections() -> None:
    layer = _layer(num_state_heads=2)
    x = torch.randn(3, 32)
    q, k, v = layer.project(x)
    raw_q = (x @ layer.memory_q_proj.T).view(3, 2, 8)
    assert torch.allclose(q, torch.tanh(raw_q) / torch.tanh(raw_q).norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.allclose(q.norm(dim=-1), torch.ones(3, 2), atol=1e-6)
    assert torch.allclose(v, (x @ layer.memory_v_proj.T).view(3, 2, 8), atol=1e-6)
    assert torch.allclose(_layer(normalize_qk=False).project(x)[1],
                          (x @ _layer(normalize_qk=False).memory_k_proj.T).view(3, 1, 8), atol=1e-6)


def test_f2_gates() -> None:
    x = torch.randn(5, 32)
    layer = _layer(rankwise_gates=False, num_state_heads=2, state_update_mode="lambda_outside")
    keep, erase, write = layer.coefficients(x)
    beta = torch.sigmoid(x @ layer.beta_proj.T + layer.beta_bias)          # [5, 2]: one gate per state head
    assert keep.shape == (5, 2, 8)
    assert torch.allclose(write, beta[:, :, None].expand(5, 2, 8), atol=1e-6)
    assert torch.allclose(keep, 1 - write, atol=1e-6) and torch.allclose(erase, keep * write, atol=1e-6)


def test_f3_one_token_update_by_hand() -> None:
    from delta_mem_vllm.ops.scan import scan_reference
    S = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    q, k, v = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.6, 0.8]]]), torch.tensor([[[2.0, -1.0]]])
    keep, erase, write = torch.tensor([[[0.5, 0.9]]]), torch.tensor([[[0.25, 0.1]]]), torch.tensor([[[0.25, 0.2]]])
    new, read = scan_reference(S, q, k, v, keep, erase, write)
    assert torch.allclose(read, torch.tensor([[[1.0, 3.0]]]))               # S_{t−1} q: rows · q
    # row 0: 0.5·[1,2] − 0.25·(2.2)·[.6,.8] + 0.25·2·[.6,.8]; row 1: 0.9·[3,4] − 0.1·(5.0)·k + 0.2·(−1)·k
    row0 = torch.tensor([0.5, 1.0]) - 0.55 * torch.tensor([0.6, 0.8]) + 0.5 * torch.tensor([0.6, 0.8])
    row1 = torch.tensor([2.7, 3.6]) - 0.5 * torch.tensor([0.6, 0.8]) - 0.2 * torch.tensor([0.6, 0.8])
    assert torch.allclose(new[0], torch.stack([row0, row1]), atol=1e-6)


def test_f4_f5_corrections_scale_and_o_rmsnorm() -> None:
    layer = _layer(delta_heads=("q", "o"), delta_o_rmsnorm=True, trainable_delta_scale=True,
                   delta_scale_granularity="head")
    r = torch.randn(4, 8)
    mu_q = torch.sigmoid(layer.delta_scale_raw[0]) * 2.0
    assert torch.allclose(layer.correction("q", r, torch.float32), r @ layer.delta_q_proj.T * 2.0 * mu_q, atol=1e-6)
    mu_o = torch.sigmoid(layer.delta_scale_raw[3]) * 2.0
    scaled = r @ layer.delta_o_proj.T * 2.0 * mu_o
    want = F.rms_norm(scaled, (32,), layer.delta_o_rmsnorm_weight, eps=1e-6)
    assert torch.allclose(layer.correction("o", r, torch.float32), want, atol=1e-5)
