"""Stored Responses API responses (`store: true`): what `GET /v1/responses/{id}` returns and where a
`previous_response_id` continues (its session). Small JSON documents beside the session states, in
the same backend, keyed like them by a hash of (owner, id) so that ids never become paths or keys.

A document is written before the turn that produced it commits and removed if that commit is known
to have failed, so a session never names a response that cannot be read. A document belongs to one
incarnation of its session: once the session is deleted (even if its id is used again) it is gone.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from delta_mem_vllm.state.backends import _write_atomic
from server.settings import Settings

_DOMAIN = "delta-mem-response-v1"


def document_key(owner: str, response_id: str) -> str:
    payload = json.dumps([_DOMAIN, owner, response_id], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


class MemoryDocuments:
    def __init__(self) -> None:
        self._docs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def put(self, key: str, blob: bytes) -> None:
        with self._lock:
            self._docs[key] = blob

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._docs.get(key)

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._docs.pop(key, None) is not None


class FileDocuments:
    """`<state_dir>/responses/<key[:2]>/<key>.json`, written atomically (temp, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def put(self, key: str, blob: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(path.parent, path.name, blob)

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False


class RedisDocuments:
    """`<prefix>response:<key>` strings (the session states' keys are hashes: no collision)."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self._prefix = f"{prefix}response:"

    def put(self, key: str, blob: bytes) -> None:
        self._client.set(self._prefix + key, blob)

    def get(self, key: str) -> bytes | None:
        return self._client.get(self._prefix + key)

    def delete(self, key: str) -> bool:
        return bool(self._client.delete(self._prefix + key))


def build_documents(settings: Settings) -> Any:
    if settings.state_backend == "filesystem":
        return FileDocuments(Path(settings.state_dir) / "responses")
    if settings.state_backend == "redis":
        return RedisDocuments(settings.redis_url or "", settings.redis_prefix)
    return MemoryDocuments()


class ResponseStore:
    """Response documents per owner: {"response": <object>, "session_id", "input_items", "written"}."""

    def __init__(self, documents: Any) -> None:
        self._docs = documents

    def put(self, owner: str, response_id: str, document: dict[str, Any]) -> None:
        self._docs.put(document_key(owner, response_id), json.dumps(document, ensure_ascii=False).encode())

    def get(self, owner: str, response_id: str) -> dict[str, Any] | None:
        blob = self._docs.get(document_key(owner, response_id))
        return None if blob is None else json.loads(blob)

    def delete(self, owner: str, response_id: str) -> bool:
        return self._docs.delete(document_key(owner, response_id))
