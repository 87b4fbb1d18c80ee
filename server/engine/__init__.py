"""Engines behind the server. `build_engine` picks one from the settings (--engine torch|vllm|auto)."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from server.engine.base import Engine, EngineError, GenerationOutput, GenerationRequest, MemorySpec, SamplingParams

log = logging.getLogger("deltamem.engine")

__all__ = ["Engine", "EngineError", "EngineUnavailable", "GenerationOutput", "GenerationRequest", "MemorySpec",
           "SamplingParams", "build_engine", "choose_engine"]

VLLM_UNAVAILABLE = ("the vLLM engine is not available in this build of delta-mem-vllm; "
                    "use --engine torch (the embedded engine) or --engine auto")


class EngineUnavailable(EngineError):
    """The requested engine cannot run here (not built, not installed, no device)."""


def _vllm_engine_module() -> str | None:
    """The VllmEngine module when this build ships one (a later issue), else None."""
    return "server.engine.vllm_engine" if importlib.util.find_spec("server.engine.vllm_engine") else None


def choose_engine(requested: str) -> str:
    """'torch' or 'vllm'. auto = vLLM when this build has its engine, vllm imports and a GPU is present."""
    if requested == "torch":
        return "torch"
    if requested == "vllm":
        if _vllm_engine_module() is None:
            raise EngineUnavailable(VLLM_UNAVAILABLE)
        return "vllm"
    import torch

    if _vllm_engine_module() and importlib.util.find_spec("vllm") and torch.cuda.is_available():
        return "vllm"
    return "torch"


def build_engine(settings: Any) -> Any:
    kind = choose_engine(settings.engine)
    log.info("engine: %s (requested %s)", kind, settings.engine)
    if kind == "vllm":  # pragma: no cover - no VllmEngine in this build
        module = importlib.import_module(_vllm_engine_module())  # type: ignore[arg-type]
        return module.VllmEngine.from_settings(settings)
    from server.engine.torch_engine import TorchEngine

    return TorchEngine.from_settings(settings)
