"""The vLLM engine arguments that serve a backbone with a Δ-Mem adapter (no vLLM import here).

`engine_kwargs` feeds `vllm.AsyncEngineArgs`/`vllm.LLM`; `serve_flags` spells the same for
`python -m vllm.entrypoints.openai.api_server` (stateless Δ-Mem: every request starts from a zero
state, as the paper evaluates it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import CONFIG_FILE, DeltaMemConfig
from . import MODEL_CLASSES
from .protocol import ADAPTER_KEY, VALID_VOCAB_KEY, check_servable

CONNECTOR = {"kv_connector": "DeltaMemConnector", "kv_connector_module_path": "delta_mem_vllm.vllm.connector",
             "kv_role": "kv_both"}
WORKER_EXTENSION = "delta_mem_vllm.vllm.worker_ext.DeltaMemWorkerExtension"


class LaunchError(ValueError):
    """A model/adapter pair the vLLM engine cannot serve; the message says why and what to do."""


def model_class_for(hf_config: Any) -> str:
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in MODEL_CLASSES:
            return MODEL_CLASSES[arch]
    raise LaunchError(f"architecture {archs or '(none)'} is not supported by the vLLM engine "
                      f"(supported: {', '.join(sorted(MODEL_CLASSES))}); use the embedded engine (--engine torch)")


def check_pair(model: str | Path, adapter: str | Path) -> tuple[Any, Path, dict[str, Any]]:
    """(backbone config, adapter directory, layer overrides) when vLLM can serve the pair, else LaunchError."""
    from transformers import AutoConfig

    from .compat import hybrid_layer_overrides

    adapter_dir = Path(adapter).resolve()
    if adapter_dir.is_file():
        adapter_dir = adapter_dir.parent
    try:
        check_servable(DeltaMemConfig.load(adapter_dir / CONFIG_FILE))
        hf_config = AutoConfig.from_pretrained(str(model))
        model_class_for(hf_config)
        return hf_config, adapter_dir, hybrid_layer_overrides(hf_config)
    except ValueError as exc:
        raise LaunchError(str(exc)) from exc


def hf_overrides(model: str | Path, adapter: str | Path, *, valid_vocab: int | None = None) -> dict[str, Any]:
    """Point vLLM at our model class and pass the adapter directory and tokenizer size along."""
    hf_config, adapter_dir, layer_overrides = check_pair(model, adapter)
    overrides: dict[str, Any] = {"architectures": [model_class_for(hf_config)], ADAPTER_KEY: str(adapter_dir),
                                 **layer_overrides}
    if valid_vocab:
        overrides[VALID_VOCAB_KEY] = int(valid_vocab)
    return overrides


def engine_kwargs(model: str | Path, adapter: str | Path, *, valid_vocab: int | None = None,
                  **engine: Any) -> dict[str, Any]:
    """Keyword arguments for `AsyncEngineArgs`/`LLM`; `engine` adds or overrides vLLM settings."""
    if engine.get("enable_prefix_caching"):
        raise LaunchError("prefix caching cannot be used with Δ-Mem: cached KV depends on the memory state it "
                          "was computed from, so it must never be shared between requests with different states")
    return {"model": str(model), "hf_overrides": hf_overrides(model, adapter, valid_vocab=valid_vocab),
            "kv_transfer_config": dict(CONNECTOR), "worker_extension_cls": WORKER_EXTENSION,
            **engine, "enable_prefix_caching": False, **sync_scheduling()}


def sync_scheduling() -> dict[str, Any]:
    """Async scheduling off (vLLM's default on CUDA; CPUs never use it). It counts a request's next
    token as computed before it is sampled, so a turn that ends on EOS reports a state that has
    written the EOS: the turn would commit it as written where the embedded engine leaves it pending
    (the next turn writes it first, under that turn's context), and the memories would differ."""
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:   # flags for a vLLM installed elsewhere: it defaults to what its platform does
        return {}
    return {"async_scheduling": False} if "async_scheduling" in getattr(EngineArgs, "__dataclass_fields__", {}) else {}


def serve_flags(model: str | Path, adapter: str | Path, *, valid_vocab: int | None = None) -> list[str]:
    """`vllm serve`-style flags serving the model with Δ-Mem (zero initial state per request)."""
    kwargs = engine_kwargs(model, adapter, valid_vocab=valid_vocab)
    return ["--model", kwargs["model"], "--hf-overrides", json.dumps(kwargs["hf_overrides"]),
            "--kv-transfer-config", json.dumps(kwargs["kv_transfer_config"]),
            "--worker-extension-cls", kwargs["worker_extension_cls"], "--no-enable-prefix-caching"]
