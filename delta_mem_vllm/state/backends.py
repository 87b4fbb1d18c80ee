"""Persistent tier backends: filesystem (embedded default), Redis (several replicas), memory (tests).

Every backend stores the same thing: the safetensors bytes and the JSON manifest of
:mod:`delta_mem_vllm.state.format`, under a storage key (64 hex chars from
:func:`~delta_mem_vllm.state.keys.storage_key`; raw session ids are refused). ``get`` verifies the
checksums, so corruption surfaces as :class:`StateFormatError`, never as a silently zeroed memory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import uuid
import zlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .format import Snapshot, StateFormatError, decode_snapshot, encode_snapshot, validate_manifest
from .keys import is_storage_key, validate_storage_key

__all__ = [
    "ABSENT",
    "FilesystemBackend",
    "MemoryBackend",
    "PersistentBackend",
    "RedisBackend",
    "VersionConflict",
    "record_revision",
]

# expect_revision=ABSENT: the key must not exist yet
ABSENT = "<absent>"


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

    def put(self, key: str, snapshot: Snapshot, expect_revision: str | None = None) -> None:
        """Store ``snapshot`` under ``key``; durable (per the backend's guarantees) when it returns.
        With ``expect_revision`` (ABSENT: must not exist) the put happens only over that revision."""

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


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


class MemoryBackend:
    """In-process backend holding encoded bytes (so it exercises the real format and never aliases).

    For tests and for a "no persistence" server: data dies with the process.
    """

    shared = False

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, bytes, str]] = {}
        self._lock = threading.Lock()

    def put(self, key: str, snapshot: Snapshot, expect_revision: str | None = None) -> None:
        validate_storage_key(key)
        data, manifest = encode_snapshot(snapshot)
        blob = json.dumps(manifest).encode()  # store serialised: no shared mutable record
        with self._lock:
            item = self._data.get(key)
            _check_expected(key, None if item is None else item[2], expect_revision)
            self._data[key] = (data, blob, record_revision(snapshot.record))

    def revision(self, key: str) -> str | None:
        validate_storage_key(key)
        with self._lock:
            item = self._data.get(key)
        return None if item is None else item[2]

    def _load(self, key: str) -> tuple[bytes, dict[str, Any]] | None:
        validate_storage_key(key)
        with self._lock:
            item = self._data.get(key)
        if item is None:
            return None
        data, blob, _ = item
        return data, json.loads(blob)

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
            _check_expected(key, None if item is None else item[2], expect_revision)
            return self._data.pop(key, None) is not None

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._data)

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"MemoryBackend({len(self._data)} keys)"


# --------------------------------------------------------------------------------------------------
# Filesystem
# --------------------------------------------------------------------------------------------------

_MANIFEST_FILE = "manifest.json"
_DATA_PREFIX = "state-"
_DATA_SUFFIX = ".safetensors"
_TMP_PREFIX = ".tmp-"
_DEL_PREFIX = ".del-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(directory: Path, name: str, payload: bytes, *, fsync: bool = True) -> None:
    """temp file in the same directory → write → fsync → rename → fsync(directory).

    Without ``fsync`` the rename is still atomic against a crash of this process (not power loss).
    """
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        _fsync_dir(directory)


class FilesystemBackend:
    """Snapshots as files under ``root``, crash-safe without a journal.

    Layout (derived from the storage key only; session ids never reach a path)::

        root/<key[:2]>/<key>/manifest.json                  {"data_file": "state-<uuid>.safetensors",
                                                              "manifest": <format manifest>}
        root/<key[:2]>/<key>/state-<uuid>.safetensors        the tensors (one per layer)

    A put writes a *new* uniquely named tensor file (temp + fsync + rename + fsync dir), then
    atomically replaces ``manifest.json`` the same way, then removes the tensor files the manifest no
    longer names. A ``kill -9`` at any instant therefore leaves ``manifest.json`` pointing at a complete
    tensor file: the old snapshot or the new one, never a mix. Leftovers (``.tmp-*`` files,
    unreferenced tensor files, ``.del-*`` directories of interrupted deletes) are ignored by reads and
    removed by :meth:`cleanup` (run on start). Safe for many threads of one process; several
    processes writing the same root are not supported (use Redis for several replicas).
    """

    shared = False   # one process writes a root

    def __init__(self, root: str | os.PathLike[str], *, clean_on_start: bool = True, fsync: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fsync = fsync
        self._locks = _StripedLocks()
        if clean_on_start:
            self.cleanup()

    def __repr__(self) -> str:
        return f"FilesystemBackend({str(self.root)!r})"

    def _dir(self, key: str) -> Path:
        validate_storage_key(key)
        return self.root / key[:2] / key

    def _ensure_dir(self, d: Path) -> None:
        if d.is_dir():
            return
        created_parent = not d.parent.is_dir()
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._fsync:  # make the new directory entries themselves durable
            _fsync_dir(d.parent)
            if created_parent:
                _fsync_dir(self.root)

    def put(self, key: str, snapshot: Snapshot, expect_revision: str | None = None) -> None:
        data, manifest = encode_snapshot(snapshot)
        d = self._dir(key)
        data_name = f"{_DATA_PREFIX}{uuid.uuid4().hex}{_DATA_SUFFIX}"
        pointer = json.dumps({"data_file": data_name, "manifest": manifest}, separators=(",", ":")).encode()
        with self._locks(key):
            if expect_revision is not None:
                _check_expected(key, self._revision_locked(d), expect_revision)
            self._ensure_dir(d)
            self._write(d, data_name, data)
            self._write(d, _MANIFEST_FILE, pointer)  # the commit point
            self._remove_stale(d, keep=data_name)

    def _write(self, d: Path, name: str, payload: bytes) -> None:
        _write_atomic(d, name, payload, fsync=self._fsync)

    @staticmethod
    def _remove_stale(d: Path, keep: str | None) -> int:
        removed = 0
        for entry in os.scandir(d):
            n = entry.name
            stale_data = n.startswith(_DATA_PREFIX) and n.endswith(_DATA_SUFFIX) and n != keep
            if stale_data or n.startswith(_TMP_PREFIX):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def _read_pointer(self, d: Path) -> dict[str, Any] | None:
        try:
            raw = (d / _MANIFEST_FILE).read_bytes()
        except FileNotFoundError:
            return None  # absent, or a first write that crashed before its commit point
        try:
            pointer = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise StateFormatError(f"corrupted state manifest {d / _MANIFEST_FILE}: {exc}") from exc
        if not isinstance(pointer, dict) or not isinstance(pointer.get("data_file"), str) or "manifest" not in pointer:
            raise StateFormatError(f"corrupted state manifest {d / _MANIFEST_FILE}: unexpected structure")
        name = pointer["data_file"]
        if not (name.startswith(_DATA_PREFIX) and name.endswith(_DATA_SUFFIX)) or "/" in name or os.sep in name:
            raise StateFormatError(f"corrupted state manifest {d / _MANIFEST_FILE}: bad data_file {name[:80]!r}")
        return pointer

    def get(self, key: str) -> Snapshot | None:
        d = self._dir(key)
        with self._locks(key):
            pointer = self._read_pointer(d)
            if pointer is None:
                return None
            try:
                data = (d / pointer["data_file"]).read_bytes()
            except FileNotFoundError as exc:
                raise StateFormatError(f"state tensor file {pointer['data_file']} named by {d / _MANIFEST_FILE} is missing") from exc
        return decode_snapshot(data, pointer["manifest"])

    def get_manifest(self, key: str) -> dict[str, Any] | None:
        d = self._dir(key)
        with self._locks(key):
            pointer = self._read_pointer(d)
        return None if pointer is None else validate_manifest(pointer["manifest"])

    def _revision_locked(self, d: Path) -> str | None:
        pointer = self._read_pointer(d)
        return None if pointer is None else record_revision(pointer["manifest"].get("record") or {})

    def revision(self, key: str) -> str | None:
        d = self._dir(key)
        with self._locks(key):
            return self._revision_locked(d)

    def contains(self, key: str) -> bool:
        return (self._dir(key) / _MANIFEST_FILE).is_file()

    def delete(self, key: str, expect_revision: str | None = None) -> bool:
        d = self._dir(key)
        with self._locks(key):
            if expect_revision is not None:
                _check_expected(key, self._revision_locked(d), expect_revision)
            if not d.is_dir():
                return False
            existed = (d / _MANIFEST_FILE).is_file()
            # Rename first (atomic): an interrupted delete leaves a ".del-*" dir that reads ignore.
            grave = d.parent / f"{_DEL_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
            os.replace(d, grave)
            if self._fsync:
                _fsync_dir(d.parent)
            shutil.rmtree(grave, ignore_errors=True)
            return existed

    def keys(self) -> list[str]:
        out: list[str] = []
        for shard in os.scandir(self.root):
            if not shard.is_dir(follow_symlinks=False) or len(shard.name) != 2:
                continue
            for entry in os.scandir(shard.path):
                if is_storage_key(entry.name) and entry.name[:2] == shard.name and os.path.isfile(os.path.join(entry.path, _MANIFEST_FILE)):
                    out.append(entry.name)
        return sorted(out)

    def cleanup(self) -> int:
        """Remove leftovers of interrupted writes/deletes; returns how many entries were removed."""
        removed = 0
        for shard in os.scandir(self.root):
            if shard.is_file(follow_symlinks=False) and shard.name.startswith(_TMP_PREFIX):
                os.unlink(shard.path)
                removed += 1
                continue
            if not shard.is_dir(follow_symlinks=False) or len(shard.name) != 2:
                continue
            for entry in os.scandir(shard.path):
                if entry.name.startswith(_DEL_PREFIX) or entry.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(entry.path, ignore_errors=True) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
                    removed += 1
                elif is_storage_key(entry.name) and entry.is_dir(follow_symlinks=False):
                    with self._locks(entry.name):
                        try:
                            pointer = self._read_pointer(Path(entry.path))
                        except StateFormatError:
                            continue  # keep evidence of a corrupted manifest; get() reports it
                        if pointer is None:
                            # A first write that never reached its commit point: only leftovers inside.
                            removed += self._remove_stale(Path(entry.path), keep=None)
                            try:
                                os.rmdir(entry.path)
                            except OSError:
                                pass
                        else:
                            removed += self._remove_stale(Path(entry.path), keep=pointer["data_file"])
        return removed

    def ping(self) -> bool:
        """The root exists and is writable (a probe file is created and removed)."""
        try:
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + "ping-", dir=self.root)
            os.close(fd)
            os.unlink(tmp)
            return True
        except OSError:
            return False

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------


class RedisBackend:
    """Snapshots in Redis, one hash per key ``<prefix><key>`` with fields ``manifest`` and ``data``.

    Both fields and the record's ``version`` and ``revision`` are written by one ``HSET`` (atomic in Redis), so a reader
    sees the old pair or the new pair; a conditional put or delete runs as one Lua script (atomic
    compare-and-set), which makes replicas sharing the server safe without any lock service. "Durable on return" means acknowledged by the Redis server; surviving a Redis restart is
    Redis' own persistence configuration (AOF ``appendfsync always|everysec`` or RDB), to be set by the
    operator. Requires the ``redis`` package (extra ``delta-mem-vllm[redis]``).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "deltamem:",
        *,
        socket_timeout: float = 5.0,
        client: Any = None,
    ) -> None:
        if client is None:
            try:
                import redis
            except ImportError as exc:  # pragma: no cover - depends on the environment
                raise RuntimeError("RedisBackend needs the 'redis' package: pip install 'delta-mem-vllm[redis]'") from exc
            client = redis.Redis.from_url(
                url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, decode_responses=False
            )
        self._client = client
        self.url = url
        self.prefix = prefix
        self._cas_put = client.register_script(_CAS_PUT)
        self._cas_delete = client.register_script(_CAS_DELETE)
        self._current = client.register_script(_REVISION)

    shared = True   # other replicas write the same keys

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, prefix={self.prefix!r})"

    def _rkey(self, key: str) -> str:
        return self.prefix + validate_storage_key(key)

    def put(self, key: str, snapshot: Snapshot, expect_revision: str | None = None) -> None:
        data, manifest = encode_snapshot(snapshot)
        blob = json.dumps(manifest, separators=(",", ":")).encode()
        fields = {"manifest": blob, "data": data, "version": int(snapshot.record.get("version", 0)),
                  "revision": record_revision(snapshot.record)}
        if expect_revision is None:
            self._client.hset(self._rkey(key), mapping=fields)
            return
        found = self._cas_put(keys=[self._rkey(key)], args=[expect_revision, blob, data, fields["version"],
                                                            fields["revision"]])
        if found != b"ok" and found != "ok":
            _check_expected(key, _found_revision(found), expect_revision)

    def revision(self, key: str) -> str | None:
        found = self._current(keys=[self._rkey(key)])
        return _found_revision(found)

    @staticmethod
    def _parse_manifest(key: str, blob: bytes) -> dict[str, Any]:
        try:
            return json.loads(blob)
        except (UnicodeDecodeError, ValueError) as exc:
            raise StateFormatError(f"corrupted state manifest in Redis for key {key}: {exc}") from exc

    def get(self, key: str) -> Snapshot | None:
        blob, data = self._client.hmget(self._rkey(key), ["manifest", "data"])
        if blob is None and data is None:
            return None
        if blob is None or data is None:
            raise StateFormatError(f"incomplete state in Redis for key {key}: manifest or data missing")
        return decode_snapshot(data, self._parse_manifest(key, blob))

    def get_manifest(self, key: str) -> dict[str, Any] | None:
        blob = self._client.hget(self._rkey(key), "manifest")
        return None if blob is None else validate_manifest(self._parse_manifest(key, blob))

    def contains(self, key: str) -> bool:
        return bool(self._client.exists(self._rkey(key)))

    def delete(self, key: str, expect_revision: str | None = None) -> bool:
        if expect_revision is None:
            return bool(self._client.delete(self._rkey(key)))
        found = self._cas_delete(keys=[self._rkey(key)], args=[expect_revision])
        if found not in (b"ok", "ok"):
            _check_expected(key, _found_revision(found), expect_revision)
        return True

    def keys(self) -> list[str]:
        out = []
        n = len(self.prefix)
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix) + "*"
        for raw in self._client.scan_iter(match=pattern.encode(), count=1000):
            name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            if is_storage_key(name[n:]):
                out.append(name[n:])
        return sorted(out)

    def ping(self) -> bool:
        try:
            return bool(self._client.ping())
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return False

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass


# KEYS[1] the hash. Its revision is the `revision` field when that belongs to the `version` field
# beside it (a replica of an older release writes `version` alone and leaves a stale `revision`),
# else the version; states written before either field: from the manifest's record.
_CURRENT = """
local function current()
  if redis.call('EXISTS', KEYS[1]) == 0 then return nil end
  local f = redis.call('HMGET', KEYS[1], 'version', 'revision')
  if f[1] then
    if f[2] and string.sub(f[2], 1, string.len(f[1]) + 1) == f[1] .. '-' then return f[2] end
    return f[1]
  end
  local ok, m = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'manifest') or '')
  if ok and type(m) == 'table' and type(m['record']) == 'table' then
    local r = m['record']
    local v = string.format('%d', tonumber(r['version'] or 0) or 0)
    if type(r['commit_id']) == 'string' and r['commit_id'] ~= '' then return v .. '-' .. r['commit_id'] end
    return v
  end
  return '?'
end
"""
# ARGV[1] the expected revision ('<absent>': the key must not exist)
_COMPARE = _CURRENT + """
local cur = current()
if (ARGV[1] == '<absent>' and cur ~= nil) or (ARGV[1] ~= '<absent>' and cur ~= ARGV[1]) then
  if cur == nil then return '<absent>' end
  return cur
end
"""
_REVISION = _CURRENT + """
local cur = current()
if cur == nil then return '<absent>' end
return cur
"""
_CAS_PUT = _COMPARE + """
redis.call('HSET', KEYS[1], 'manifest', ARGV[2], 'data', ARGV[3], 'version', ARGV[4], 'revision', ARGV[5])
return 'ok'
"""
_CAS_DELETE = _COMPARE + """
redis.call('DEL', KEYS[1])
return 'ok'
"""


def _found_revision(found: Any) -> str | None:
    text = found.decode() if isinstance(found, bytes) else str(found)
    return None if text == ABSENT else text
