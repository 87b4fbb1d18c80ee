"""What every persistent backend promises: revisions, conditional writes, documents, quotas.

Every backend stores the same thing: the safetensors bytes and the JSON manifest of
:mod:`delta_mem_vllm.state.format`, under a storage key (64 hex chars from
:func:`~delta_mem_vllm.state.keys.storage_key`; raw session ids are refused). ``get`` verifies the
checksums, so corruption surfaces as :class:`StateFormatError`, never as a silently zeroed memory.

Small documents (the server's stored responses) may be attached to a state: they are found by name,
and deleted with their state in the same step, so nothing of a deleted session stays behind. A
state and its documents count against a :class:`Quota` group (the server's owner), whose limits
are checked in the same atomic step as the write.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..format import Snapshot

# expect_revision=ABSENT: the key must not exist yet
ABSENT = "<absent>"


@dataclass(frozen=True)
class Quota:
    """Who a write counts against and the group's limits (None: unlimited)."""

    group: str
    max_states: int | None = None
    max_bytes: int | None = None


class QuotaExceeded(RuntimeError):
    """A write would take its group past a limit (``kind``: "states" or "bytes"); nothing changed."""

    def __init__(self, kind: str, limit: int, used: int | None = None) -> None:
        self.kind, self.limit, self.used = kind, limit, used
        what = "states" if kind == "states" else "bytes stored"
        super().__init__(f"the quota of {limit} {what} is reached" + (f" ({used} in use)" if used is not None else ""))


class VersionConflict(RuntimeError):
    """A conditional put or delete found another revision under the key: another writer (a replica
    sharing the backend) committed first. Nothing was changed."""


def record_revision(record: dict[str, Any]) -> str:
    """The identity of the commit that wrote ``record``: ``"<version>-<commit_id>"``.

    Versions alone repeat (a session deleted and created again starts over at 0, and a store that
    loses its last second of writes on a crash rolls one back), so a compare-and-set on the version
    would accept a stale writer. The random commit id never repeats; records written before commit
    ids existed are identified by their version alone.
    """
    version = int(record.get("version", 0))
    commit_id = record.get("commit_id")
    return f"{version}-{commit_id}" if commit_id else str(version)


@runtime_checkable
class PersistentBackend(Protocol):
    """The persistent tier. Implementations must be thread-safe.

    Conditional writes make replicas that share a backend safe without a lock service: a commit
    names the revision it started from (``expect_revision``, see :func:`record_revision`) and fails
    with VersionConflict when another one is stored. ``shared`` backends can change under a process
    (other writers), so the tiered store checks ``revision`` before trusting a resident copy.
    """

    shared: bool

    def put(self, key: str, snapshot: Snapshot, expect_revision: str | None = None,
            quota: Quota | None = None, expires_at: float | None = None) -> None:
        """Store ``snapshot`` under ``key``; durable (per the backend's guarantees) when it returns.
        With ``expect_revision`` (ABSENT: must not exist) the put happens only over that revision;
        with ``quota``, only within its limits (QuotaExceeded). A state keeps the group it was
        first stored with. ``expires_at`` (any clock the caller uses) files the key for
        :meth:`expiring`; None: never."""

    def revision(self, key: str) -> str | None:
        """The stored record's revision, None when absent (cheap: no tensor bytes)."""

    def get(self, key: str) -> Snapshot | None:
        """The CPU snapshot, None when absent; StateFormatError when stored data is corrupted."""

    def get_manifest(self, key: str) -> dict[str, Any] | None:
        """The verified manifest only (cheap: no tensor bytes), None when absent."""

    def contains(self, key: str) -> bool: ...

    def delete(self, key: str, expect_revision: str | None = None) -> bool:
        """Remove ``key``; True when something was removed. With ``expect_revision``, only that
        revision (VersionConflict when another one is stored)."""

    def keys(self) -> list[str]: ...

    def put_document(self, key: str, name: str, blob: bytes, quota: Quota | None = None) -> None:
        """Store document ``name`` attached to the state ``key`` (VersionConflict when that state
        does not exist), counted against the state's group within ``quota``'s byte limit."""

    def get_document(self, name: str) -> bytes | None: ...

    def delete_document(self, key: str, name: str) -> bool: ...

    def usage(self, group: str) -> tuple[int, int]:
        """(states, bytes) stored for ``group``: state tensors, manifests and documents."""

    def group_keys(self, group: str) -> list[str]:
        """The keys stored in ``group`` (an index: no scan of other groups)."""

    def expiring(self, until: float) -> list[str]:
        """The keys whose ``expires_at`` is at or before ``until`` (an index: no scan)."""

    def ping(self) -> bool:
        """Readiness: True when the backend is reachable and writable."""

    def close(self) -> None: ...


def _check_expected(key: str, current: str | None, expect: str | None) -> None:
    if expect is None:
        return
    if (current is None) != (expect == ABSENT) or (current is not None and current != expect):
        want = "no state" if expect == ABSENT else f"revision {expect}"
        have = "none" if current is None else f"revision {current}"
        raise VersionConflict(f"state {key[:12]}… changed: expected {want}, found {have}")


class _StripedLocks:
    """Bounded per-key locking: same key → same lock; different keys rarely contend."""

    def __init__(self, n: int = 64) -> None:
        self._locks = [threading.Lock() for _ in range(n)]

    def __call__(self, key: str) -> threading.Lock:
        return self._locks[zlib.crc32(key.encode()) % len(self._locks)]


class UsageLedger:
    """In-process per-group usage, members and expiry times for the backends that one process
    writes (memory, filesystem): checked and changed under one lock, so a limit is never passed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: dict[str, list[int]] = {}
        self._members: dict[str, set[str]] = {}
        self._group_of: dict[str, str] = {}
        self._expiry: dict[str, float] = {}

    def file(self, key: str, group: str | None, expires_at: float | None) -> None:
        """``key`` is stored in ``group`` (None: removed), expiring at ``expires_at``."""
        with self._lock:
            old = self._group_of.pop(key, None)
            if old is not None:
                self._members[old].discard(key)
            if group is not None:
                self._members.setdefault(group, set()).add(key)
                self._group_of[key] = group
            if group is None or expires_at is None:
                self._expiry.pop(key, None)
            else:
                self._expiry[key] = expires_at

    def group_keys(self, group: str) -> list[str]:
        with self._lock:
            return sorted(self._members.get(group, ()))

    def expiring(self, until: float) -> list[str]:
        with self._lock:
            return sorted(k for k, t in self._expiry.items() if t <= until)

    def charge(self, group: str, states: int, nbytes: int, quota: Quota | None) -> None:
        """Add ``states`` and ``nbytes`` (either may be negative) to ``group``; QuotaExceeded when a
        growth would pass ``quota``'s limits."""
        with self._lock:
            used = self._used.setdefault(group, [0, 0])
            if quota is not None:
                if states > 0 and quota.max_states is not None and used[0] + states > quota.max_states:
                    raise QuotaExceeded("states", quota.max_states, used[0])
                if nbytes > 0 and quota.max_bytes is not None and used[1] + nbytes > quota.max_bytes:
                    raise QuotaExceeded("bytes", quota.max_bytes, used[1])
            used[0] += states
            used[1] += nbytes

    def usage(self, group: str) -> tuple[int, int]:
        with self._lock:
            states, nbytes = self._used.get(group, (0, 0))
        return states, nbytes


class LedgerIndexes:
    """Usage and indexes read from an in-process UsageLedger (``self._usage``)."""

    _usage: UsageLedger

    def usage(self, group: str) -> tuple[int, int]:
        return self._usage.usage(group)

    def group_keys(self, group: str) -> list[str]:
        return self._usage.group_keys(group)

    def expiring(self, until: float) -> list[str]:
        return self._usage.expiring(until)
