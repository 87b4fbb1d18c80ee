"""Builds the tiered session-state store (delta_mem_vllm.state) from the settings."""

from __future__ import annotations

from typing import Any, Callable

from delta_mem_vllm.state import FilesystemBackend, MemoryBackend, RedisBackend, TieredStateStore
from server.settings import Settings


def build_backend(settings: Settings) -> Any:
    if settings.state_backend == "filesystem":
        return FilesystemBackend(settings.state_dir, exclusive=True)
    if settings.state_backend == "redis":
        if not settings.redis_url:
            raise ValueError("--state-backend redis needs --redis-url (or DELTAMEM_REDIS_URL)")
        return RedisBackend(settings.redis_url, prefix=settings.redis_prefix)
    return MemoryBackend()


def build_store(settings: Settings, engine: Any, on_event: Callable[[str, dict[str, Any]], None] | None = None,
                backend: Any = None) -> TieredStateStore:
    """Device tier on the engine's device; states that do not fit the loaded adapter are refused."""
    return TieredStateStore(
        backend if backend is not None else build_backend(settings),
        device=engine.device,
        device_capacity=settings.device_pool_size,
        host_capacity=settings.host_pool_size,
        expect_adapter_fingerprint=engine.adapter_fingerprint,
        expect_shape=tuple(engine.state_shape),
        expect_layer_names=list(engine.layer_names),
        on_event=on_event,
    )
