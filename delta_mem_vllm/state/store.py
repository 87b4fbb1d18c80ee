"""The tiered session-state store: device pool (LRU) → host memory (LRU) → persistent backend.

Policy, and why:
- ``put`` is the commit of a turn. With a backend it is *write-through*: the snapshot is persisted
  first and only then becomes the resident copy, so a ``kill -9`` loses at most the turn in flight and
  a failed persist (:class:`PersistError`) leaves the previously committed state in place — a turn
  that could not be made durable commits nothing.
- ``get`` finds the state in the device tier, else promotes it from the host tier, else restores it
  from the backend (counted as a restore); the caller always receives a *copy* on ``device`` (the
  state cloned, the record deep-copied), so an engine that updates its initial state in place can
  never corrupt the committed one.
- The device tier is bounded by ``device_capacity`` entries; its least recently used entries move to
  the host tier (copied to CPU, pinned when the device is CUDA). The host tier is bounded by
  ``host_capacity``; its LRU entries are dropped from memory only when they are safely in the backend.
  Entries that are not persisted (no backend, or ``write_through=False`` before :meth:`flush`) are
  never dropped: the host tier then grows past its capacity rather than losing data silently
  (``stats()["host_over_capacity"]`` shows it).
- Replicas may share a backend (Redis): a ``shared`` backend's revision (version and random commit
  id, :func:`~.backends.record_revision`) is checked before a resident copy is trusted (another
  replica may have committed since), and a commit names the revision it started from
  (``expect_revision``), so the later of two racing commits fails with VersionConflict and changes
  nothing.
- A put whose backend call fails may still have landed (a reply lost after Redis ran the script, a
  directory fsync failing after the rename): the stored revision is read back, so the caller learns
  whether it committed (return), did not (PersistError), or cannot be told (CommitUnknown).
- Thread-safe: one lock for the tier dictionaries (never held during backend I/O) plus striped
  per-key locks that order the I/O of one key (put/restore/delete of the same key never interleave).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .backends import PersistentBackend, Quota, QuotaExceeded, VersionConflict, record_revision
from .format import Snapshot, StateFormatError, check_expectations, validate_snapshot
from .keys import validate_storage_key

__all__ = ["CommitUnknown", "PersistError", "TieredStateStore"]

log = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any]], None]


class PersistError(RuntimeError):
    """The persistent backend failed (unreachable, I/O error, disk full…); ``__cause__`` has details.

    Raised by every store method that touches the backend; for ``put``/``delete`` nothing was changed
    in memory. The HTTP layer should answer 503. Corrupted data is a StateFormatError instead.
    """


class CommitUnknown(PersistError):
    """A put failed and its outcome could not be read back: the commit may or may not have landed.
    The resident copy is dropped, so the next read asks the backend."""


@contextlib.contextmanager
def _backend_errors(what: str, backend: Any) -> Iterator[None]:
    try:
        yield
    except (StateFormatError, ValueError, PersistError, VersionConflict, QuotaExceeded):
        raise  # StateFormatError is a ValueError; ValueError = invalid key (a caller bug)
    except Exception as exc:
        raise PersistError(f"{what} via {backend!r} failed: {exc}") from exc


@dataclass
class _Entry:
    """One resident state. Tier moves swap ``snap`` for a new Snapshot (never mutate one), so a
    Snapshot reference taken under the lock stays valid; the entry object itself keeps its identity."""

    snap: Snapshot
    persisted: bool
    nbytes: int


class TieredStateStore:
    """Session states by storage key, resident on ``device`` when hot, persisted by ``backend``."""

    def __init__(
        self,
        backend: PersistentBackend | None,
        *,
        device: str | torch.device = "cpu",
        device_capacity: int = 1024,
        host_capacity: int = 65536,
        expect_adapter_fingerprint: str | None = None,
        expect_shape: tuple | None = None,
        expect_layer_names: list[str] | None = None,
        on_event: EventCallback | None = None,
        write_through: bool = True,
    ) -> None:
        if device_capacity < 0 or host_capacity < 0:
            raise ValueError("device_capacity and host_capacity must be >= 0")
        self._backend = backend
        self.device = torch.device(device)
        self.device_capacity = int(device_capacity)
        self.host_capacity = int(host_capacity)
        self._expect = {
            "expect_adapter_fingerprint": expect_adapter_fingerprint,
            "expect_shape": tuple(expect_shape) if expect_shape is not None else None,
            "expect_layer_names": list(expect_layer_names) if expect_layer_names is not None else None,
        }
        self._on_event = on_event
        self._write_through = write_through
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._lock = threading.Lock()
        self._key_locks = [threading.Lock() for _ in range(64)]
        self._device: OrderedDict[str, _Entry] = OrderedDict()  # LRU first
        self._host: OrderedDict[str, _Entry] = OrderedDict()
        self._c = {
            "hits_device": 0,
            "hits_host": 0,
            "misses": 0,
            "restores": 0,
            "restore_failures": 0,
            "evictions_device": 0,
            "evictions_host": 0,
            "persists": 0,
            "persist_failures": 0,
            "deletes": 0,
            "stale_drops": 0,
        }
        self._last_persist_latency_s: float | None = None
        self._last_restore_latency_s: float | None = None

    @property
    def backend(self) -> PersistentBackend | None:
        return self._backend

    # ---------------------------------------------------------------------------------- helpers

    def _key_lock(self, key: str) -> threading.Lock:
        return self._key_locks[zlib.crc32(key.encode()) % len(self._key_locks)]

    def _emit(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        if self._on_event is None:
            return
        for name, info in events:
            try:
                self._on_event(name, info)
            except Exception:  # noqa: BLE001 - metrics must never break the data path
                log.exception("state store on_event(%r) callback failed", name)

    def _check(self, snap: Snapshot) -> None:
        check_expectations(
            adapter_fingerprint=snap.adapter_fingerprint,
            shape=tuple(snap.state.shape),
            layer_names=snap.layer_names,
            **self._expect,
        )

    def _to_host(self, snap: Snapshot) -> Snapshot:
        if snap.state.device.type == "cpu":
            return snap
        state = snap.state.detach().to("cpu")
        if self._pin:
            state = state.pin_memory()
        return dataclasses.replace(snap, state=state)

    def _lookup_locked(self, key: str, events: list) -> Snapshot | None:
        """Device hit, or promotion host → device. Caller holds ``self._lock``."""
        entry = self._device.get(key)
        if entry is not None:
            self._device.move_to_end(key)
            self._c["hits_device"] += 1
            return entry.snap
        entry = self._host.pop(key, None)
        if entry is None:
            return None
        self._c["hits_host"] += 1
        if entry.snap.state.device != self.device:
            entry.snap = dataclasses.replace(entry.snap, state=entry.snap.state.to(self.device))
        events.append(("promote", {"key": key, "bytes": entry.nbytes}))
        self._install_locked(key, entry, events)
        return entry.snap

    def _install_locked(self, key: str, entry: _Entry, events: list) -> None:
        self._host.pop(key, None)
        self._device[key] = entry
        self._device.move_to_end(key)
        while len(self._device) > self.device_capacity:
            old_key, old = self._device.popitem(last=False)
            old.snap = self._to_host(old.snap)
            self._host[old_key] = old
            self._c["evictions_device"] += 1
            events.append(("evict", {"key": old_key, "from": "device", "to": "host", "bytes": old.nbytes}))
        self._trim_host_locked(events)

    def _trim_host_locked(self, events: list) -> None:
        excess = len(self._host) - self.host_capacity
        if excess <= 0:
            return
        victims = []
        for k, e in self._host.items():  # LRU first; unpersisted entries are skipped, never dropped
            if e.persisted:
                victims.append(k)
                if len(victims) == excess:
                    break
        for k in victims:
            e = self._host.pop(k)
            self._c["evictions_host"] += 1
            events.append(("evict", {"key": k, "from": "host", "to": "persistent", "bytes": e.nbytes}))

    def _persist(self, key: str, snap: Snapshot, events: list, expect_revision: str | None = None,
                 quota: Quota | None = None, expires_at: float | None = None) -> None:
        assert self._backend is not None
        t0 = time.perf_counter()
        try:
            self._backend.put(key, snap, expect_revision=expect_revision, quota=quota, expires_at=expires_at)
        except (StateFormatError, VersionConflict, QuotaExceeded):
            raise
        except Exception as exc:
            dt = time.perf_counter() - t0
            with self._lock:
                self._c["persist_failures"] += 1
            events.append(("persist_failure", {"key": key, "latency_s": dt, "error": repr(exc)}))
            self._emit(events)
            events.clear()
            raise PersistError(f"persisting session state to {self._backend!r} failed: {exc}") from exc
        dt = time.perf_counter() - t0
        with self._lock:
            self._c["persists"] += 1
            self._last_persist_latency_s = dt
        events.append(("persist", {"key": key, "latency_s": dt, "bytes": snap.nbytes}))

    def _read_back(self, key: str, snap: Snapshot, failure: PersistError) -> None:
        """After a failed put: return when ``snap``'s revision is stored after all (the put landed),
        else raise ``failure``, or CommitUnknown when the backend cannot say. A commit id never
        repeats, so finding it stored proves this put wrote it."""
        assert self._backend is not None
        try:
            with _backend_errors("reading back a failed commit", self._backend):
                found = self._backend.revision(key)
        except PersistError as exc:
            self._forget(key)
            raise CommitUnknown(f"{failure}; its outcome could not be read back: {exc}") from failure
        if found == record_revision(snap.record):
            log.warning("a commit reported a failure but landed (read back): %s", failure)
            return
        with self._lock:
            entry = self._device.get(key) or self._host.get(key)
        if entry is not None and record_revision(entry.snap.record) != found:
            self._forget(key)
        raise failure

    def _forget(self, key: str) -> None:
        with self._lock:
            self._device.pop(key, None)
            self._host.pop(key, None)

    # ---------------------------------------------------------------------------------- API

    def get(self, key: str) -> Snapshot | None:
        """The committed snapshot (a copy, on ``device``), or None when unknown in every tier.

        Raises StateFormatError when the backend copy is corrupted and StateMismatchError when it
        belongs to another adapter/shape than the store expects.
        """
        validate_storage_key(key)
        events: list[tuple[str, dict[str, Any]]] = []
        self._drop_if_stale(key)
        with self._lock:
            snap = self._lookup_locked(key, events)
        if snap is None and self._backend is not None:
            with self._key_lock(key):
                with self._lock:  # someone may have restored/committed it meanwhile
                    snap = self._lookup_locked(key, events)
                if snap is None:
                    t0 = time.perf_counter()
                    try:
                        with _backend_errors("restoring a session state", self._backend):
                            loaded = self._backend.get(key)
                        if loaded is not None:
                            self._check(loaded)
                    except Exception as exc:
                        with self._lock:
                            self._c["restore_failures"] += 1
                        self._emit([("restore_failure", {"key": key, "error": repr(exc)})])
                        raise
                    if loaded is not None:
                        loaded.state = loaded.state.to(self.device)
                        dt = time.perf_counter() - t0
                        with self._lock:
                            self._c["restores"] += 1
                            self._last_restore_latency_s = dt
                            self._install_locked(key, _Entry(loaded, True, loaded.nbytes), events)
                        events.append(("restore", {"key": key, "latency_s": dt, "bytes": loaded.nbytes}))
                        snap = loaded
        if snap is None:
            with self._lock:
                self._c["misses"] += 1
        self._emit(events)
        return None if snap is None else snap.copy(self.device)

    def _drop_if_stale(self, key: str) -> None:
        """With a shared backend, forget a resident copy that is no longer the committed revision."""
        if self._backend is None or not getattr(self._backend, "shared", False):
            return
        with self._lock:
            entry = self._device.get(key) or self._host.get(key)
        if entry is None or not entry.persisted:
            return
        with _backend_errors("checking a session state's revision", self._backend):
            current = self._backend.revision(key)
        if current != record_revision(entry.snap.record):
            with self._lock:
                for tier in (self._device, self._host):
                    if tier.get(key) is entry:
                        del tier[key]
                self._c["stale_drops"] += 1

    def put(self, key: str, snapshot: Snapshot, expect_revision: str | None = None,
            quota: Quota | None = None, expires_at: float | None = None) -> None:
        """Commit ``snapshot`` as ``key``'s state: persisted first (write-through), then resident.

        ``expect_revision``: commit only over that stored revision (ABSENT: none), else
        VersionConflict and nothing changes (the resident copy, now known stale, is dropped).
        ``quota``: within its group's limits, else QuotaExceeded and nothing changes. ``expires_at``:
        when :meth:`expiring` lists the key (None: never).
        Raises StateFormatError (invalid/non-finite state), StateMismatchError (other adapter/shape),
        PersistError (backend failure, nothing committed: the previous state stays in place) or
        CommitUnknown (backend failure, outcome unknown). The store keeps its own copy, so the caller
        may reuse ``snapshot`` afterwards.
        """
        validate_storage_key(key)
        validate_snapshot(snapshot)
        self._check(snapshot)
        stored = snapshot.copy(self.device)
        events: list[tuple[str, dict[str, Any]]] = []
        with self._key_lock(key):
            persisted = False
            if self._backend is not None and self._write_through:
                try:
                    self._persist(key, stored, events, expect_revision, quota, expires_at)
                except VersionConflict:
                    self._forget(key)
                    raise
                except PersistError as failure:
                    self._read_back(key, stored, failure)
                persisted = True
            with self._lock:
                self._device.pop(key, None)
                self._install_locked(key, _Entry(stored, persisted, stored.nbytes), events)
        self._emit(events)

    def delete(self, key: str, expect_revision: str | None = None) -> bool:
        """Remove ``key`` from every tier (backend first, so a failure leaves it fully present);
        with ``expect_revision``, only that revision (VersionConflict otherwise)."""
        validate_storage_key(key)
        with self._key_lock(key):
            removed = False
            if self._backend is not None:
                with _backend_errors("deleting a session state", self._backend):
                    removed = (self._backend.delete(key) if expect_revision is None
                               else self._backend.delete(key, expect_revision=expect_revision))
            with self._lock:
                removed = (self._device.pop(key, None) is not None) | removed
                removed = (self._host.pop(key, None) is not None) | removed
                if removed:
                    self._c["deletes"] += 1
        if removed:
            self._emit([("delete", {"key": key})])
        return removed

    def put_document(self, key: str, name: str, blob: bytes, quota: Quota | None = None) -> None:
        """Attach document ``name`` to the stored state ``key`` (deleted with it); VersionConflict when
        that state does not exist, QuotaExceeded past ``quota``'s bytes."""
        backend = self._require_backend()
        with self._key_lock(key), _backend_errors("storing a document", backend):
            backend.put_document(key, name, blob, quota)

    def get_document(self, name: str) -> bytes | None:
        backend = self._require_backend()
        with _backend_errors("reading a document", backend):
            return backend.get_document(name)

    def delete_document(self, key: str, name: str) -> bool:
        backend = self._require_backend()
        with self._key_lock(key), _backend_errors("deleting a document", backend):
            return backend.delete_document(key, name)

    def usage(self, group: str) -> tuple[int, int]:
        """(states, bytes) the backend holds for a quota group."""
        backend = self._require_backend()
        with _backend_errors("reading usage", backend):
            return backend.usage(group)

    def group_keys(self, group: str) -> list[str]:
        """The keys of a quota group, from the backend's index."""
        backend = self._require_backend()
        with _backend_errors("listing a group's states", backend):
            return backend.group_keys(group)

    def expiring(self, until: float) -> list[str]:
        """The keys filed to expire at or before ``until``, from the backend's index."""
        backend = self._require_backend()
        with _backend_errors("listing expiring states", backend):
            return backend.expiring(until)

    def _require_backend(self) -> PersistentBackend:
        if self._backend is None:
            raise RuntimeError("documents and quotas need a persistent backend")
        return self._backend

    def tier_of(self, key: str) -> str | None:
        """``"device"``, ``"host"``, ``"persistent"`` or None (does not promote; a resident copy that
        another replica replaced or deleted is dropped first)."""
        validate_storage_key(key)
        self._drop_if_stale(key)
        with self._lock:
            if key in self._device:
                return "device"
            if key in self._host:
                return "host"
        if self._backend is not None:
            with _backend_errors("looking up a session state", self._backend):
                if self._backend.contains(key):
                    return "persistent"
        return None

    def contains(self, key: str) -> bool:
        return self.tier_of(key) is not None

    def __contains__(self, key: str) -> bool:
        return self.contains(key)

    def peek_record(self, key: str) -> dict[str, Any] | None:
        """The session record without loading tensors or changing residency (e.g. for listings)."""
        validate_storage_key(key)
        with self._lock:
            entry = self._device.get(key) or self._host.get(key)
        shared = self._backend is not None and getattr(self._backend, "shared", False)
        if entry is not None and not (shared and entry.persisted):
            return copy.deepcopy(entry.snap.record)
        if self._backend is None:
            return None
        with _backend_errors("reading a session record", self._backend):
            manifest = self._backend.get_manifest(key)
        return None if manifest is None else manifest["record"]

    def verify(self, key: str) -> None:
        """Raise what get() would raise for a state that cannot be used, without changing residency
        (a resident state was checked when it came in)."""
        validate_storage_key(key)
        self._drop_if_stale(key)
        with self._lock:
            if key in self._device or key in self._host:
                return
        if self._backend is None:
            return
        with _backend_errors("reading a session state", self._backend):
            loaded = self._backend.get(key)
        if loaded is not None:
            self._check(loaded)

    def keys(self) -> list[str]:
        """Every key in any tier (lists the backend: O(sessions))."""
        with self._lock:
            ks = set(self._device) | set(self._host)
        if self._backend is not None:
            with _backend_errors("listing session states", self._backend):
                ks.update(self._backend.keys())
        return sorted(ks)

    def flush(self) -> int:
        """Persist every resident entry not yet persisted (write-back mode, shutdown); returns count.

        Raises PersistError on the first failure (entries persisted before it stay marked).
        """
        if self._backend is None:
            return 0
        with self._lock:
            dirty = [(k, e) for tier in (self._device, self._host) for k, e in tier.items() if not e.persisted]
        done = 0
        for key, entry in dirty:
            events: list[tuple[str, dict[str, Any]]] = []
            with self._key_lock(key):
                with self._lock:
                    current = self._device.get(key) or self._host.get(key)
                if current is not entry:
                    continue  # replaced or deleted meanwhile
                self._persist(key, entry.snap, events)
                with self._lock:
                    entry.persisted = True
                    self._trim_host_locked(events)
            done += 1
            self._emit(events)
        return done

    def stats(self) -> dict[str, Any]:
        """Numbers for /metrics and /ready: residency per tier, bytes, hits, restores, evictions, persists."""
        with self._lock:
            dev_bytes = sum(e.nbytes for e in self._device.values())
            host_bytes = sum(e.nbytes for e in self._host.values())
            dirty = sum(1 for t in (self._device, self._host) for e in t.values() if not e.persisted)
            out: dict[str, Any] = {
                "backend": None if self._backend is None else type(self._backend).__name__,
                "device": str(self.device),
                "device_capacity": self.device_capacity,
                "host_capacity": self.host_capacity,
                "device_resident": len(self._device),
                "host_resident": len(self._host),
                "host_over_capacity": max(0, len(self._host) - self.host_capacity),
                "device_state_bytes": dev_bytes,
                "host_state_bytes": host_bytes,
                "state_bytes": dev_bytes + host_bytes,
                "dirty": dirty,
                "last_persist_latency_s": self._last_persist_latency_s,
                "last_restore_latency_s": self._last_restore_latency_s,
                **self._c,
            }
        return out

    def ping(self) -> bool:
        """Readiness of the persistent tier (True without a backend)."""
        if self._backend is None:
            return True
        try:
            return bool(self._backend.ping())
        except Exception:  # noqa: BLE001 - readiness probes must answer, not raise
            return False

    def close(self) -> None:
        """Flush dirty entries and close the backend (call on shutdown)."""
        try:
            self.flush()
        finally:
            if self._backend is not None and hasattr(self._backend, "close"):
                self._backend.close()
