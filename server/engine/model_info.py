"""Facts about a served backbone that every engine reports the same way, so that a session's state
is portable between engines serving the same model and adapter."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def eos_token_ids(generation_config: Any, config: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every end-of-sequence id the generation config, model config or tokenizer names."""
    ids: set[int] = set()
    for src in (getattr(generation_config, "eos_token_id", None), getattr(config, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return tuple(sorted(ids))


def config_fingerprint(config: Any) -> str:
    """Identity of the backbone architecture (states are only portable between identical ones)."""
    try:
        cfg = {k: v for k, v in config.to_dict().items()
               if k not in ("_name_or_path", "transformers_version", "dtype", "torch_dtype")}
        blob = json.dumps(cfg, sort_keys=True, default=str)
    except Exception:  # noqa: BLE001
        return ""
    return hashlib.sha256(blob.encode()).hexdigest()


def default_model_name(model_path: str) -> str:
    return str(model_path).rstrip("/").rsplit("/", 1)[-1] or str(model_path)


def load_tokenizer(settings: Any) -> Any:
    """The served model's tokenizer, with the operator's --chat-template in place of its own."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    if settings.chat_template:
        tokenizer.chat_template = settings.chat_template
    return tokenizer
