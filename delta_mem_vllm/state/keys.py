"""Session ids and storage keys.

Session ids are opaque client strings; they are never used as paths or Redis keys. Storage keys are
the SHA-256 of an unambiguous encoding of (owner, id), so ``"../../etc/passwd"`` is just another hash,
and the same id under two API keys (owners) are two different sessions.
"""

from __future__ import annotations

import hashlib
import json
import re

SESSION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
STORAGE_KEY_PATTERN = r"^[0-9a-f]{64}$"
_SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)
_STORAGE_KEY_RE = re.compile(STORAGE_KEY_PATTERN)
_KEY_DOMAIN = "delta-mem-session-v1"
_GROUP_DOMAIN = "delta-mem-owner-v1"

__all__ = [
    "SESSION_ID_PATTERN",
    "STORAGE_KEY_PATTERN",
    "is_storage_key",
    "quota_group",
    "storage_key",
    "validate_session_id",
    "validate_storage_key",
]


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is 1–128 chars of ``[A-Za-z0-9._:-]``; else raise ValueError."""
    # fullmatch, not match: "$" would accept a trailing newline.
    if not isinstance(session_id, str) or _SESSION_ID_RE.fullmatch(session_id) is None:
        shown = session_id if isinstance(session_id, str) and len(session_id) <= 40 else f"{str(session_id)[:40]}…"
        raise ValueError(f"invalid session id {shown!r}: must be 1-128 characters of [A-Za-z0-9._:-]")
    return session_id


def storage_key(owner: str | None, session_id: str) -> str:
    """The storage key of a session: 64 hex chars, SHA-256 of JSON ``[domain, owner, id]``.

    JSON array encoding is unambiguous (``None`` ≠ ``""`` ≠ ``"null"``; no separator collisions).
    The id is validated first so that a raw, unvalidated id can never reach a backend.
    """
    validate_session_id(session_id)
    if owner is not None and not isinstance(owner, str):
        raise ValueError(f"owner must be a string or None, got {type(owner).__name__}")
    payload = json.dumps([_KEY_DOMAIN, owner, session_id], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def quota_group(owner: str | None) -> str:
    """The quota group of an owner: a digest, so an API key never appears in a store key."""
    payload = json.dumps([_GROUP_DOMAIN, owner], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()[:32]


def is_storage_key(key: object) -> bool:
    return isinstance(key, str) and _STORAGE_KEY_RE.fullmatch(key) is not None


def validate_storage_key(key: object) -> str:
    """Backends accept only derived keys (64 lowercase hex), so a raw session id can't become a path."""
    if not is_storage_key(key):
        raise ValueError(f"invalid storage key {str(key)[:80]!r}: expected 64 lowercase hex chars (use storage_key())")
    return key  # type: ignore[return-value]
