"""Δ-Mem for vLLM: model classes, the state layer and its backend, the KV connector, the worker extension.

This package is the only place (with `server/engine/vllm_engine.py`) that imports vLLM, and it does
so lazily: importing `delta_mem_vllm.vllm` itself is free. vLLM calls `register()` in every process
through the `vllm.general_plugins` entry point.
"""

from __future__ import annotations

# backbone architecture in config.json → the Δ-Mem model class that serves it on vLLM
MODEL_CLASSES: dict[str, str] = {
    "Qwen3ForCausalLM": "DeltaMemQwen3ForCausalLM",
    "Qwen2ForCausalLM": "DeltaMemQwen2ForCausalLM",
    "LlamaForCausalLM": "DeltaMemLlamaForCausalLM",
    "SmolLM3ForCausalLM": "DeltaMemLlamaForCausalLM",
}
SCAN_SPLITTING_OP = "vllm::deltamem_scan"


def register() -> None:
    """Register the Δ-Mem model classes (lazily, by name) and the scan as a CUDA-graph splitting op.

    Idempotent and cheap, imports no model code and touches no device, as vLLM requires of plugins.
    """
    import logging

    from vllm import ModelRegistry
    from vllm.config import CompilationConfig

    from .compat import UnsupportedVllm, installed_version

    try:
        installed_version()
    except UnsupportedVllm as exc:   # never break vLLM for models that are not ours
        logging.getLogger("deltamem.vllm").warning("%s; Δ-Mem model classes are not registered", exc)
        return
    known = set(ModelRegistry.get_supported_archs())
    for name in sorted(set(MODEL_CLASSES.values())):
        if name not in known:
            ModelRegistry.register_model(name, f"delta_mem_vllm.vllm.models:{name}")
    # piecewise CUDA graphs must split at the scan: inside a graph it would see no metadata
    if SCAN_SPLITTING_OP not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(SCAN_SPLITTING_OP)
