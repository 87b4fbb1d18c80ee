"""In-process backend: tests, and a server that keeps nothing across restarts."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

from ..format import Snapshot, decode_snapshot, encode_snapshot, validate_manifest
from ..keys import validate_storage_key
from .base import LedgerIndexes, Quota, UsageLedger, VersionConflict, _check_expected, record_revision


@dataclass
class _Stored:
    data: bytes
    manifest: bytes
    revision: str
    group: str
    documents: dict[str, bytes] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return len(self.data) + len(self.manifest) + sum(len(d) for d in self.documents.values())


class MemoryBackend(LedgerIndexes):
    """In-process backend holding encoded bytes (so it exercises the real format and never aliases).

    For tests and for a "no persistence" server: data dies with the process.
    """

    shared = False

    def __init__(self) -> None:
        self._data: dict[str, _Stored] = {}
        self._owner_of: dict[str, str] = {}     # document name -> state key
        self._lock = threading.Lock()
        self._usage = UsageLedger()

    def put(self, key: str, snapshot: Snapshot, expect_revision: str | None = None,
            quota: Quota | None = None, expires_at: float | None = None) -> None:
        validate_storage_key(key)
        data, manifest = encode_snapshot(snapshot)
        blob = json.dumps(manifest).encode()  # store serialised: no shared mutable record
        with self._lock:
            item = self._data.get(key)
            _check_expected(key, None if item is None else item.revision, expect_revision)
            group = item.group if item is not None else quota.group if quota is not None else ""
            old = 0 if item is None else len(item.data) + len(item.manifest)
            self._usage.charge(group, int(item is None), len(data) + len(blob) - old, quota)
            docs = {} if item is None else item.documents
            self._data[key] = _Stored(data, blob, record_revision(snapshot.record), group, docs)
            self._usage.file(key, group, expires_at)

    def revision(self, key: str) -> str | None:
        validate_storage_key(key)
        with self._lock:
            item = self._data.get(key)
        return None if item is None else item.revision

    def _load(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        validate_storage_key(key)
        with self._lock:
            item = self._data.get(key)
        return None if item is None else (item.data, json.loads(item.manifest))

    def get(self, key: str) -> Snapshot | None:
        item = self._load(key)
        return None if item is None else decode_snapshot(item[0], item[1])

    def get_manifest(self, key: str) -> dict[str, Any] | None:
        item = self._load(key)
        return None if item is None else validate_manifest(item[1])

    def contains(self, key: str) -> bool:
        validate_storage_key(key)
        with self._lock:
            return key in self._data

    def delete(self, key: str, expect_revision: str | None = None) -> bool:
        validate_storage_key(key)
        with self._lock:
            item = self._data.get(key)
            _check_expected(key, None if item is None else item.revision, expect_revision)
            if item is None:
                return False
            del self._data[key]
            self._usage.file(key, None, None)
            for name in item.documents:
                self._owner_of.pop(name, None)
            self._usage.charge(item.group, -1, -item.nbytes, None)
            return True

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._data)

    def put_document(self, key: str, name: str, blob: bytes, quota: Quota | None = None) -> None:
        validate_storage_key(key)
        with self._lock:
            item = self._data.get(key)
            if item is None:
                raise VersionConflict(f"state {key[:12]}… does not exist: no document can be attached to it")
            self._usage.charge(item.group, 0, len(blob) - len(item.documents.get(name, b"")), quota)
            item.documents[name] = bytes(blob)
            self._owner_of[name] = key

    def get_document(self, name: str) -> bytes | None:
        with self._lock:
            key = self._owner_of.get(name)
            return None if key is None else self._data[key].documents.get(name)

    def delete_document(self, key: str, name: str) -> bool:
        with self._lock:
            item = self._data.get(key)
            blob = None if item is None else item.documents.pop(name, None)
            if blob is None:
                return False
            self._owner_of.pop(name, None)
            self._usage.charge(item.group, 0, -len(blob), None)
            return True


    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"MemoryBackend({len(self._data)} keys)"
