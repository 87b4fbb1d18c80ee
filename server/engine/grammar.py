"""Grammar-constrained decoding for the embedded engine, with xgrammar configured as the vLLM engine
configures vLLM's structured outputs (xgrammar backend, compact JSON), so that both engines allow
the same tokens at every step. The vLLM engine hands the same `StructuredOutput` to vLLM instead.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

from server.engine.base import StructuredOutput

# JSON without optional whitespace: small models otherwise tend to loop on blanks between fields
SEPARATORS = (",", ":")


class GrammarError(ValueError):
    """A schema the grammar compiler cannot turn into a grammar (the client's fault: 400)."""


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer, made on first use and caching compiled grammars."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
            return self._compiler

    def constraint(self, spec: StructuredOutput, stop_ids: tuple[int, ...]) -> "Constraint":
        schema = '{"type": "object"}' if spec.kind == "json_object" else spec.schema
        try:
            compiled = self._get().compile_json_schema(schema, any_whitespace=False, separators=SEPARATORS)
        except (RuntimeError, ValueError, json.JSONDecodeError) as exc:
            raise GrammarError(f"the JSON schema cannot be compiled to a grammar: {exc}") from None
        return Constraint(compiled, stop_ids, self.vocab_size)


class Constraint:
    """One request's grammar state: which tokens may come next, advanced by each sampled token."""

    def __init__(self, compiled: Any, stop_ids: tuple[int, ...], vocab_size: int) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_ids) or None)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self._apply = xgr.apply_token_bitmask_inplace

    @property
    def terminated(self) -> bool:
        return self._matcher.is_terminated()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [V] with every token the grammar forbids at -inf (a copy)."""
        if self.terminated:
            return logits
        self._matcher.fill_next_token_bitmask(self._bitmask)
        out = logits.float().clone().unsqueeze(0)
        self._apply(out, self._bitmask.to(out.device))
        return out[0]

    def accept(self, token: int) -> None:
        if not self.terminated and not self._matcher.accept_token(token):
            raise RuntimeError(f"token {token} was sampled against the grammar")
