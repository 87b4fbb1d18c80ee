"""The per-session record stored next to the state (Snapshot.record), and the written-token digest.

The record is JSON; the state package stores it verbatim. Everything a turn changes lives here or in
the state tensor, and both are written by one store.put, so a turn commits atomically.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

RECORD_VERSION = 1
EMPTY_DIGEST = "0" * 64


def extend_digest(digest: str, token_ids: Iterable[int]) -> str:
    """Rolling sha256 over the written token stream, one step per token.

    Per-token chaining makes the digest depend only on the stream, never on how it was cut into
    turns, so two clients that write the same tokens in the same order get the same digest.
    """
    d = bytes.fromhex(digest)
    for t in token_ids:
        d = hashlib.sha256(d + int(t).to_bytes(4, "little", signed=False)).digest()
    return d.hex()


@dataclass
class SessionRecord:
    session_id: str
    owner: str
    created_at: float
    last_used_at: float
    ttl: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    version: int = 0
    turns: int = 0
    tokens_written: int = 0                 # length of the written stream since the last reset
    written_digest: str = EMPTY_DIGEST      # rolling sha256 of that stream
    message_log: list[str] = field(default_factory=list)      # non-system messages written, in order
    written_system: list[str] = field(default_factory=list)   # system messages written
    pending_token_ids: list[int] = field(default_factory=list)
    written_token_ids: list[int] | None = None                # debug setting only
    record_version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SessionRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def expired(self, now: float) -> bool:
        return self.ttl is not None and now - self.last_used_at > self.ttl

    def clear_memory(self) -> None:
        """What a reset forgets: the stream, the message log and the pending tokens."""
        self.tokens_written = 0
        self.written_digest = EMPTY_DIGEST
        self.message_log = []
        self.written_system = []
        self.pending_token_ids = []
        if self.written_token_ids is not None:
            self.written_token_ids = []

    def record_written(self, token_ids: list[int], keep_tokens: bool) -> None:
        self.written_digest = extend_digest(self.written_digest, token_ids)
        self.tokens_written += len(token_ids)
        if keep_tokens:
            self.written_token_ids = (self.written_token_ids or []) + list(token_ids)
