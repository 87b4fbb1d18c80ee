"""Incremental detokenization with stop strings (pure; used by engines that stream text).

Text is released only when it is stable: no trailing partial UTF-8 character, and nothing that
could still turn into a stop string. The final text excludes the stop string, as OpenAI does.
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Feeds generated ids one at a time; returns text deltas whose concatenation is the reply."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), skip_special_tokens: bool = True,
                 min_tokens: int = 0) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._min_tokens = min_tokens   # stop strings count only once more ids than this were added
        self.text = ""            # decoded so far (stable part)
        self._emitted = 0         # chars of self.text already returned
        self.stopped = False      # a stop string was found; self.text is cut before it

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def _advance(self, final: bool) -> None:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)

    def _release(self, final: bool) -> str:
        if self._stop and len(self._ids) > self._min_tokens:
            start = max(0, self._emitted - self._hold)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                final = True
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta

    def add(self, token_id: int) -> str:
        """Add one generated id; returns newly stable text (may be empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        self._advance(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: release everything still held back."""
        if not self.stopped:
            self._advance(final=True)
        return self._release(final=True)
