"""The per-session record stored next to the state (Snapshot.record), and the written-token digest.

The record is JSON; the state package stores it verbatim. Everything a turn changes lives here or in
the state tensor, and both are written by one store.put, so a turn commits atomically.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from delta_mem_vllm.state import record_revision

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
    last_response_id: str | None = None     # the Responses API response this state follows, if any
    commit_id: str = ""                     # random per commit: with the version, the commit's identity
    incarnation: str = ""                   # random per creation: a deleted and recreated id is another session
    record_version: int = RECORD_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SessionRecord":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def new(cls, **fields: Any) -> "SessionRecord":
        """A session's first record: a new incarnation, committed as version 0."""
        return cls(**{**fields, "incarnation": uuid.uuid4().hex, "commit_id": uuid.uuid4().hex})

    @property
    def revision(self) -> str:
        """What a commit over this record expects to find stored (see record_revision)."""
        return record_revision({"version": self.version, "commit_id": self.commit_id})

    def next_commit(self, now: float, *, bump: bool = True) -> None:
        """Make this record the next commit: a new commit id, used now, and (unless only the use
        is recorded) the next version."""
        self.version += int(bump)
        self.commit_id = uuid.uuid4().hex
        self.last_used_at = now

    def expired(self, now: float) -> bool:
        return self.ttl is not None and now - self.last_used_at > self.ttl

    def clear_memory(self) -> None:
        """What a reset forgets: the stream, the message log and the pending tokens."""
        self.tokens_written = 0
        self.written_digest = EMPTY_DIGEST
        self.message_log = []
        self.written_system = []
        self.pending_token_ids = []
        self.last_response_id = None
        if self.written_token_ids is not None:
            self.written_token_ids = []

    def remember(self, messages: list[str], system: list[str], message_log_max: int) -> None:
        """Append written log entries, keeping the newest `message_log_max` messages and WRITTEN_SYSTEM_MAX
        system entries (a system prompt that changes every turn, e.g. with a timestamp, would otherwise
        grow the record by one entry a turn). A forgotten system entry resent later is written again."""
        self.message_log = (self.message_log + messages)[-message_log_max:]
        self.written_system = (self.written_system + [e for e in system if e not in self.written_system]
                               )[-WRITTEN_SYSTEM_MAX:]

    def record_written(self, token_ids: list[int], keep_tokens: bool) -> None:
        self.written_digest = extend_digest(self.written_digest, token_ids)
        self.tokens_written += len(token_ids)
        if keep_tokens:
            self.written_token_ids = (self.written_token_ids or []) + list(token_ids)


MAX_PENDING = 64   # a turn leaves one pending token; more only from a crafted document
WRITTEN_SYSTEM_MAX = 64   # system messages (and tool lists) remembered as written
_LOG_ENTRY = re.compile(r"^[a-z]+:[0-9a-f]{32}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def memory_record_problem(data: dict[str, Any], vocab_size: int | None) -> str | None:
    """What is wrong with the memory bookkeeping of an imported record, or None.

    An import may only carry bookkeeping that a later turn can use as it is: counters that are
    counts, a digest, log entries as sessions write them, token ids of this vocabulary, and a
    written-token list (when present) that is the stream the digest and the count describe.
    """
    def count(name: str) -> str | None:
        value = data.get(name, 0)
        return None if type(value) is int and value >= 0 else f"{name} must be a non-negative integer"

    def token_ids(name: str, values: Any) -> str | None:
        if not isinstance(values, list) or any(type(t) is not int for t in values):
            return f"{name} must be a list of token ids"
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in values):
            return f"{name} has token ids outside the vocabulary [0, {vocab_size})"
        return None

    for problem in (count("turns"), count("tokens_written")):
        if problem:
            return problem
    if not isinstance(data.get("written_digest", EMPTY_DIGEST), str) or not _DIGEST.match(
            data.get("written_digest", EMPTY_DIGEST)):
        return "written_digest must be 64 hex digits"
    for name in ("message_log", "written_system"):
        entries = data.get(name, [])
        if not isinstance(entries, list) or any(not isinstance(e, str) or not _LOG_ENTRY.match(e) for e in entries):
            return f"{name} must be a list of 'role:digest' entries"
    pending = data.get("pending_token_ids", [])
    problem = token_ids("pending_token_ids", pending)
    if problem or len(pending) > MAX_PENDING:
        return problem or f"pending_token_ids has more than {MAX_PENDING} tokens"
    written = data.get("written_token_ids")
    if written is not None:
        problem = token_ids("written_token_ids", written)
        if problem:
            return problem
        if len(written) != data.get("tokens_written", 0):
            return "written_token_ids does not have tokens_written entries"
        if extend_digest(EMPTY_DIGEST, written) != data.get("written_digest", EMPTY_DIGEST):
            return "written_token_ids does not match written_digest"
    return None
