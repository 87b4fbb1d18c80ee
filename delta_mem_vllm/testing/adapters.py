"""Random Δ-Mem adapters whose memory path is active (non-zero output heads, varied gates)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..adapter import Adapter, save_adapter
from ..config import DELTA_HEADS, DeltaMemConfig


def randomize_(model: nn.Module, seed: int = 0, delta_std: float = 0.3) -> None:
    """Overwrite a DeltaMemModel's Δ-Mem parameters in place, as the method's conformance checks do.

    Active delta heads ~ N(0, delta_std²), gates with slopes and biases around σ(−1) so that
    tokens write with varied strength; inactive heads stay zero as the reference keeps them.
    """
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda p, mean, std: p.copy_((torch.randn(p.shape, generator=gen) * std + mean).to(p.dtype))  # noqa: E731
    with torch.no_grad():
        for layer in model.layers:
            cfg = layer.config
            bound = layer.memory_q_proj.shape[1] ** -0.5  # the kaiming-uniform(a=√5) range, but seeded
            for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
                p = getattr(layer, name)
                p.copy_(((torch.rand(p.shape, generator=gen) * 2 - 1) * bound).to(p.dtype))
            for head in DELTA_HEADS:
                if head in cfg.delta_heads:
                    rnd(getattr(layer, f"delta_{head}_proj"), 0.0, delta_std)
            rnd(layer.beta_proj, 0.0, 0.05)
            rnd(layer.beta_bias, -1.0, 0.5)
            if not cfg.couple_lambda:
                rnd(layer.lambda_proj, 0.0, 0.05)
                rnd(layer.lambda_bias, 1.5, 0.5)
            if cfg.delta_o_rmsnorm:
                rnd(layer.delta_o_rmsnorm_weight, 1.0, 0.1)
            if cfg.trainable_delta_scale:
                rnd(layer.delta_scale_raw, 0.0, 0.5)


def random_adapter(model: nn.Module, config: DeltaMemConfig | None = None, seed: int = 0) -> Adapter:
    """A random adapter for a transformers model (the model is left without hooks afterwards)."""
    from ..hf import DeltaMemModel

    torch.manual_seed(seed)
    dm = DeltaMemModel(model, config or DeltaMemConfig(delta_heads=("q", "o")))
    try:
        randomize_(dm, seed)
        return dm.adapter()
    finally:
        dm.detach_hooks()


def save_random_adapter(model_or_dir: nn.Module | str | Path, out_dir: str | Path,
                        config: DeltaMemConfig | None = None, seed: int = 0,
                        formats: tuple[str, ...] = ("safetensors",)) -> Path:
    """Write a random adapter for a model (or a local checkpoint directory) to `out_dir`."""
    model = model_or_dir
    if not isinstance(model, nn.Module):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_or_dir), dtype=torch.float32)
    return save_adapter(random_adapter(model, config, seed), out_dir, formats=formats)
