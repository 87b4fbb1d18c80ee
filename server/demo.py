"""`delta-mem-vllm demo-model DIR` / `serve --demo`: a tiny random model + random adapter, built offline."""

from __future__ import annotations

from pathlib import Path


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
