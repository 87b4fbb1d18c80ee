"""Δ-Mem online memory for frozen LLMs: the math, adapters, the transformers integration and state I/O.

vLLM is never imported from here; the vLLM plugin lives in `delta_mem_vllm.vllm` (a later addition).
"""

from .adapter import Adapter, AdapterError, load_adapter, save_adapter
from .config import DeltaMemConfig, DeltaMemConfigError
from .hf import DeltaMemModel, DeltaMemOutput

__version__ = "0.1.0"

__all__ = ["Adapter", "AdapterError", "DeltaMemConfig", "DeltaMemConfigError", "DeltaMemModel", "DeltaMemOutput",
           "load_adapter", "save_adapter", "__version__"]
