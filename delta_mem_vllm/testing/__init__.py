"""Offline test/demo helpers (tiny random checkpoints, in-code tokenizer)."""

from delta_mem_vllm.testing.tiny import (
    CHAT_TEMPLATE,
    TINY_ARCHS,
    TINY_VOCAB_SIZE,
    build_tiny_model,
    build_tokenizer,
    save_tiny_checkpoint,
    special_token_ids,
    tiny_config,
)

__all__ = [
    "CHAT_TEMPLATE",
    "TINY_ARCHS",
    "TINY_VOCAB_SIZE",
    "build_tiny_model",
    "build_tokenizer",
    "save_tiny_checkpoint",
    "special_token_ids",
    "tiny_config",
]
