"""What a vLLM start on a CPU leaves to the machine, decided before the engine starts: `--dtype auto`
and the KV cache size (the arithmetic is server/engine/kv_budget.py; this is the glue that reads the
model's shape, the checkpoint's size and the memory vLLM's CPU worker will check)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from server.engine.base import EngineError

log = logging.getLogger("deltamem.engine")

CPU_BLOCK_TOKENS = 128   # vLLM's KV block on a CPU (platforms/cpu.py), unless a block size is set


def settle_cpu_defaults(settings: Any) -> Any:
    """The settings with what a CPU start leaves to the machine filled in, logged once: `--dtype auto`
    (bf16 where the CPU has it natively) and, unless the operator sized it, the KV cache (see
    server/engine/kv_budget.py). On a GPU `auto` stays vLLM's (the checkpoint's dtype) and the KV cache
    takes vLLM's share of the device. EngineError with one line when even one request cannot fit."""
    if torch.cuda.is_available():
        return settings
    from server.engine.hardware import resolve_dtype

    update: dict[str, Any] = {"dtype": resolve_dtype(settings.dtype, "cpu")}
    if settings.dtype == "auto":
        log.info("dtype auto: %s on this CPU (%s bf16)", update["dtype"],
                 "native" if update["dtype"] == "bfloat16" else "no native")
    sized = (settings.kv_cache_memory_bytes is not None or settings.gpu_memory_utilization is not None
             or os.environ.get("VLLM_CPU_KVCACHE_SPACE"))
    if not sized:
        update["max_num_seqs"], update["kv_cache_memory_bytes"] = _plan_cpu_kv_cache(settings, update["dtype"])
    return settings.model_copy(update=update)


def _plan_cpu_kv_cache(settings: Any, dtype: str) -> tuple[int, int]:
    """(max_num_seqs, KV cache bytes) for a CPU start the operator did not size."""
    from transformers import AutoConfig
    from vllm.config import SchedulerConfig

    from delta_mem_vllm.vllm.compat import cpu_memory
    from server.engine.kv_budget import KvCacheWontFit, KvShape, plan_cpu_kv_cache

    config = AutoConfig.from_pretrained(settings.model).get_text_config()
    max_model_len = settings.max_model_len or config.max_position_embeddings
    max_num_seqs = settings.max_num_seqs or SchedulerConfig.DEFAULT_MAX_NUM_SEQS
    available, _ = cpu_memory()
    try:
        plan = plan_cpu_kv_cache(KvShape(kv_bytes_per_token(config, dtype, settings.tensor_parallel_size),
                                         block_tokens=CPU_BLOCK_TOKENS),
                                 max_model_len=max_model_len, max_num_seqs=max_num_seqs, available=available,
                                 weights=weight_bytes(settings.model, config, dtype))
    except KvCacheWontFit as exc:
        raise EngineError(str(exc)) from None
    log.info("%s", plan.reason)
    return max_num_seqs, plan.bytes


def kv_bytes_per_token(config: Any, dtype: str, tensor_parallel_size: int = 1) -> int:
    """K and V of every layer for one token, on one worker (KV heads shard, or replicate when fewer)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_worker = max(1, kv_heads // tensor_parallel_size)
    return 2 * config.num_hidden_layers * per_worker * head_dim * torch.finfo(getattr(torch, dtype)).bits // 8


def weight_bytes(model: str, config: Any, dtype: str) -> int:
    """The checkpoint's weights once loaded in `dtype` (its files' size, rescaled from the stored dtype);
    0 for a hub id (not on disk yet)."""
    root = Path(model).expanduser()
    files = [f for pattern in ("*.safetensors", "*.bin") for f in root.glob(pattern)] if root.is_dir() else []
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    scale = torch.finfo(getattr(torch, dtype)).bits / torch.finfo(stored).bits
    return int(sum(f.stat().st_size for f in files) * scale)
