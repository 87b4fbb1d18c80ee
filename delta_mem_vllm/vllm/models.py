"""Δ-Mem model classes for vLLM: vLLM's own Qwen3, Qwen2 and Llama (SmolLM2, SmolLM3) with memory.

Each class subclasses vLLM's model, lets it build itself, then gives every targeted attention layer
a `delta_mem` child (`layer.DeltaMemAttentionMemory`) and a forward that threads the memory through
it: reads from the attention input, δq|δk|δv on the packed qkv projection (before q/k norms and
RoPE, so the corrections enter the KV cache), δo after `o_proj` (after its all-reduce under tensor
parallelism, so it is added once). The adapter directory and the tokenizer's vocabulary size come
in through `hf_overrides` (see `launch.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import get_temporal_copy_spec
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from ..adapter import assign_adapter, load_adapter
from .compat import fix_cpu_seeded_sampling
from .layer import DeltaMemAttentionMemory
from .protocol import ADAPTER_KEY, VALID_VOCAB_KEY, DeltaMemUnsupported, adapter_config


def _qk_norm(attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head q/k RMSNorm where the backbone has one (Qwen3 always, Qwen2 when configured)."""
    if not getattr(attn, "qk_norm", hasattr(attn, "q_norm")):
        return q, k
    head = attn.head_dim
    q = attn.q_norm(q.view(*q.shape[:-1], q.shape[-1] // head, head)).view(q.shape)
    k = attn.k_norm(k.view(*k.shape[:-1], k.shape[-1] // head, head)).view(k.shape)
    return q, k


def _attention_forward(self: nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """vLLM's Qwen/Llama attention forward with the memory threaded through."""
    reads = self.delta_mem.read(hidden_states)
    qkv, _ = self.qkv_proj(hidden_states)
    q, k, v = self.delta_mem.correct_qkv(qkv, reads).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
    q, k = _qk_norm(self, q, k)
    if self.delta_mem_rope:
        q, k = self.rotary_emb(positions, q, k)
    output, _ = self.o_proj(self.attn(q, k, v))
    return self.delta_mem.correct_o(output, reads)


_WITH_MEMORY: dict[type, type] = {}


def _with_memory(cls: type) -> type:
    """The backbone's attention class with the Δ-Mem forward (created once per class)."""
    if cls not in _WITH_MEMORY:
        _WITH_MEMORY[cls] = type(f"DeltaMem{cls.__name__}", (cls,), {"forward": _attention_forward})
    return _WITH_MEMORY[cls]


class DeltaMemHybridMixin:
    """What every Δ-Mem model class adds to its vLLM base class (listed before it; the interface
    protocols go after the base, whose `__init__` they must not shadow)."""

    def _attach_delta_mem(self, vllm_config: VllmConfig) -> None:
        hf = vllm_config.model_config.hf_config
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise DeltaMemUnsupported("Δ-Mem models do not support pipeline parallelism (use tensor parallelism)")
        if vllm_config.cache_config.enable_prefix_caching:
            raise DeltaMemUnsupported("Δ-Mem models cannot use prefix caching: cached KV depends on the memory "
                                      "state it was computed from (pass --no-enable-prefix-caching)")
        if vllm_config.device_config.device.type == "cpu":
            fix_cpu_seeded_sampling()
        self.delta_mem_config = config = adapter_config(hf)
        self._delta_mem_adapter_dir = getattr(hf, ADAPTER_KEY)
        no_rope = getattr(hf, "no_rope_layers", None)   # SmolLM3: 0 marks a NoPE layer
        self.delta_mem_layers: dict[str, DeltaMemAttentionMemory] = {}
        for layer in self.model.layers[self.model.start_layer:self.model.end_layer]:
            attn = layer.self_attn
            name = attn.attn.layer_name.rsplit(".", 1)[0]          # model.layers.{i}.self_attn
            index = extract_layer_index(name)
            if config.target_layers and index not in config.target_layers:
                continue
            qkv = attn.qkv_proj
            attn.delta_mem = DeltaMemAttentionMemory(
                config, hidden_size=hf.hidden_size, q_out=qkv.total_num_heads * qkv.head_size,
                kv_out=qkv.total_num_kv_heads * qkv.head_size, qkv_proj=qkv, prefix=f"{name}.delta_mem")
            attn.delta_mem_rope = not no_rope or bool(no_rope[index])
            attn.__class__ = _with_memory(type(attn))
            self.delta_mem_layers[name] = attn.delta_mem
        valid_vocab = getattr(hf, VALID_VOCAB_KEY, None)
        if valid_vocab and valid_vocab < hf.vocab_size:   # padded embedding rows the tokenizer cannot decode
            self.logits_processor = LogitsProcessor(hf.vocab_size, org_vocab_size=valid_vocab)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = set(super().load_weights(weights))
        adapter = load_adapter(self._delta_mem_adapter_dir)
        assign_adapter(adapter, self.delta_mem_layers)
        dtype = next(iter(self.model.parameters())).dtype
        for name, memory in self.delta_mem_layers.items():
            memory.finalize(dtype)
            loaded.update(f"{name}.delta_mem.{p}" for p, _ in memory.named_parameters(recurse=False))
        return loaded

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        config = adapter_config(vllm_config.model_config.hf_config)
        return (1,), config.state_shape

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return torch.int64, torch.float32

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple[Any, ...]:
        return get_temporal_copy_spec, get_temporal_copy_spec


class DeltaMemQwen3ForCausalLM(DeltaMemHybridMixin, Qwen3ForCausalLM, IsHybrid, HasInnerState):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_delta_mem(vllm_config)


class DeltaMemQwen2ForCausalLM(DeltaMemHybridMixin, Qwen2ForCausalLM, IsHybrid, HasInnerState):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_delta_mem(vllm_config)


class DeltaMemLlamaForCausalLM(DeltaMemHybridMixin, LlamaForCausalLM, IsHybrid, HasInnerState):
    """Llama 3.x, SmolLM2, and SmolLM3 (a Llama whose `no_rope_layers` skip RoPE)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_delta_mem(vllm_config)

