"""Shared builders for the library tests: tiny random backbones with random, active Δ-Mem adapters."""

from __future__ import annotations

import torch

from delta_mem_vllm.config import DeltaMemConfig
from delta_mem_vllm.hf import DeltaMemModel
from delta_mem_vllm.testing.adapters import randomize_
from delta_mem_vllm.testing.tiny import build_tiny_model

RELEASED_LIKE = dict(rank=8, alpha=16.0, delta_heads=("q", "o"), output_init="base_slice_fixed")

# The released-like adapter and the six variants of the method's conformance checks.
VARIANTS: dict[str, dict] = {
    "released_like": RELEASED_LIKE,
    "qkvo_heads": {**RELEASED_LIKE, "delta_heads": ("q", "k", "v", "o")},
    "state_heads_4": {**RELEASED_LIKE, "num_state_heads": 4},
    "scalar_gates": {**RELEASED_LIKE, "rankwise_gates": False},
    "lambda_outside_uncoupled": {**RELEASED_LIKE, "state_update_mode": "lambda_outside", "couple_lambda": False},
    "no_lambda": {**RELEASED_LIKE, "state_update_mode": "no_lambda"},
    "o_rmsnorm_head_scale": {**RELEASED_LIKE, "delta_heads": ("q", "k", "v", "o"), "delta_o_rmsnorm": True,
                             "trainable_delta_scale": True, "delta_scale_granularity": "head"},
}


def make_dm(arch: str = "qwen3", variant: str | dict = "released_like", attn: str = "eager", seed: int = 0,
            dtype: torch.dtype = torch.float32) -> DeltaMemModel:
    cfg = DeltaMemConfig(**(VARIANTS[variant] if isinstance(variant, str) else variant))
    model = build_tiny_model(arch, seed=seed, dtype=dtype, attn_implementation=attn)
    dm = DeltaMemModel(model, cfg).eval()
    randomize_(dm, seed=seed + 1)
    return dm


def rand_ids(batch: int, length: int, seed: int = 0, vocab: int = 280) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
