"""Filesystem backend: crash-safe files, one writing process per root."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from ..format import Snapshot, StateFormatError, decode_snapshot, encode_snapshot, validate_manifest
from ..keys import is_storage_key, validate_storage_key
from .base import LedgerIndexes, Quota, UsageLedger, VersionConflict, _check_expected, _StripedLocks, record_revision

_MANIFEST_FILE = "manifest.json"
_DATA_PREFIX = "state-"
_DATA_SUFFIX = ".safetensors"
_TMP_PREFIX = ".tmp-"
_DEL_PREFIX = ".del-"
_DOC_PREFIX = "doc-"
_DOC_SUFFIX = ".json"
_INDEX_DIR = "documents"     # root/documents/<name[:2]>/<name>: the key of the state holding it
_LEGACY_DOCS = "responses"   # root/responses/<name[:2]>/<name>.json: documents of earlier releases


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


def _lock(root: Path) -> Any:
    """The open, exclusively locked ``root/.lock``, or None when another process holds it."""
    f = open(root / ".lock", "a+b")   # noqa: SIM115 - held for the backend's life; closing unlocks
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def directory_in_use(root: str | os.PathLike[str]) -> bool:
    """Whether a server holds ``root`` (checked before a server loads its model)."""
    if not (Path(root) / ".lock").exists():
        return False
    f = _lock(Path(root))
    if f is not None:
        f.close()
    return f is None


def _pointer_revision(pointer: dict[str, Any] | None) -> str | None:
    return None if pointer is None else record_revision(pointer["manifest"].get("record") or {})


def _holds(path: Path, payload: bytes) -> bool:
    try:
        return path.read_bytes() == payload
    except OSError:
        return False


class FilesystemBackend(LedgerIndexes):
    """Snapshots as files under ``root``, crash-safe without a journal.

    Layout (derived from the storage key only; session ids never reach a path)::

        root/<key[:2]>/<key>/manifest.json                  {"data_file": "state-<uuid>.safetensors",
                                                              "manifest": <format manifest>,
                                                              "group": <quota group>}
        root/<key[:2]>/<key>/state-<uuid>.safetensors        the tensors (one per layer)
        root/<key[:2]>/<key>/doc-<name>.json                 documents attached to the state
        root/documents/<name[:2]>/<name>                     the key of the state holding document <name>

    A put writes a *new* uniquely named tensor file (temp + fsync + rename + fsync dir), then
    atomically replaces ``manifest.json`` the same way, then removes the tensor files the manifest no
    longer names. A ``kill -9`` at any instant therefore leaves ``manifest.json`` pointing at a complete
    tensor file: the old snapshot or the new one, never a mix. Leftovers (``.tmp-*`` files,
    unreferenced tensor files, ``.del-*`` directories of interrupted deletes) are ignored by reads and
    removed by :meth:`cleanup` (run on start). Documents live in their state's directory, so the
    rename that deletes a state deletes them in the same step; an index entry left pointing at a
    deleted state reads as absent and is removed by :meth:`cleanup`. Usage per quota group is
    counted from the files on start and kept in memory. Safe for many threads of one process;
    several processes writing the same root are not supported (use Redis for several replicas).
    """

    shared = False   # one process writes a root

    def __init__(self, root: str | os.PathLike[str], *, clean_on_start: bool = True, fsync: bool = True,
                 exclusive: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fsync = fsync
        self._lock_file = _lock(self.root) if exclusive else None   # a second server would corrupt it
        if exclusive and self._lock_file is None:
            raise RuntimeError(f"state directory {str(self.root)!r} is in use by another process (one server "
                               "per directory; several replicas share sessions through Redis)")
        self._locks = _StripedLocks()
        if clean_on_start:
            self.cleanup()
        self._usage = UsageLedger()
        for key in self.keys():
            d = self._dir(key)
            try:
                pointer = self._read_pointer(d)
            except StateFormatError:
                pointer = None   # corrupted: counted by its manifest, never expires
            stored, group, nbytes = self._footprint(d, pointer)
            self._usage.charge(group, int(stored), nbytes, None)
            self._usage.file(key, group, None if pointer is None else pointer.get("expires_at"))

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

    def _counted(self, d: Path, pointer: dict[str, Any] | None = None) -> tuple[bool, str, int]:
        """(stored, group, bytes of manifest and tensors) of the state in ``d``, as counted; a
        corrupted state counts its manifest, in no group. ``pointer``: the manifest, when the caller
        has read it already."""
        manifest = d / _MANIFEST_FILE
        try:
            size = manifest.stat().st_size
        except FileNotFoundError:
            return False, "", 0
        try:
            pointer = pointer or self._read_pointer(d)
            if pointer is None:
                return True, "", size
            return True, str(pointer.get("group") or ""), size + (d / pointer["data_file"]).stat().st_size
        except (StateFormatError, OSError):
            return True, "", size

    def _footprint(self, d: Path, pointer: dict[str, Any] | None = None) -> tuple[bool, str, int]:
        """As :meth:`_counted`, documents included."""
        stored, group, nbytes = self._counted(d, pointer)
        docs = sum(e.stat().st_size for e in os.scandir(d) if e.name.startswith(_DOC_PREFIX)) if stored else 0
        return stored, group, nbytes + docs

    def put(self, key: str, snapshot: Snapshot, expect_revision: str | None = None,
            quota: Quota | None = None, expires_at: float | None = None) -> None:
        data, manifest = encode_snapshot(snapshot)
        d = self._dir(key)
        data_name = f"{_DATA_PREFIX}{uuid.uuid4().hex}{_DATA_SUFFIX}"
        with self._locks(key):
            old = None
            if expect_revision is not None:   # read once: checked, then counted
                old = self._read_pointer(d)
                _check_expected(key, _pointer_revision(old), expect_revision)
            stored, group, old_bytes = self._counted(d, old)
            if not group and quota is not None and quota.group:
                if stored:   # stored before quotas, or corrupted: it joins the writer's group
                    self._usage.charge("", -1, -old_bytes, None)
                    self._usage.charge(quota.group, 1, old_bytes, None)
                group = quota.group
            pointer = json.dumps({"data_file": data_name, "manifest": manifest, "group": group,
                                  "expires_at": expires_at}, separators=(",", ":")).encode()
            growth = len(data) + len(pointer) - old_bytes
            self._usage.charge(group, int(not stored), growth, quota)
            try:
                self._ensure_dir(d)
                self._write(d, data_name, data)
                self._write(d, _MANIFEST_FILE, pointer)  # the commit point
            except BaseException:
                if not _holds(d / _MANIFEST_FILE, pointer):   # not landed: no charge
                    self._usage.charge(group, -int(not stored), -growth, None)
                raise
            self._usage.file(key, group, expires_at)
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

    def revision(self, key: str) -> str | None:
        d = self._dir(key)
        with self._locks(key):
            return _pointer_revision(self._read_pointer(d))

    def contains(self, key: str) -> bool:
        return (self._dir(key) / _MANIFEST_FILE).is_file()

    def delete(self, key: str, expect_revision: str | None = None) -> bool:
        d = self._dir(key)
        with self._locks(key):
            old = None
            if expect_revision is not None:
                old = self._read_pointer(d)
                _check_expected(key, _pointer_revision(old), expect_revision)
            if not d.is_dir():
                return False
            existed, group, nbytes = self._footprint(d, old)
            # Rename first (atomic): an interrupted delete leaves a ".del-*" dir that reads ignore.
            grave = d.parent / f"{_DEL_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
            os.replace(d, grave)
            if existed:
                self._usage.charge(group, -1, -nbytes, None)
                self._usage.file(key, None, None)
            if self._fsync:
                _fsync_dir(d.parent)
            shutil.rmtree(grave, ignore_errors=True)
            return existed

    def _index(self, name: str) -> Path:
        validate_storage_key(name)   # document names are digests too: never a path of the caller's
        return self.root / _INDEX_DIR / name[:2] / name

    def put_document(self, key: str, name: str, blob: bytes, quota: Quota | None = None) -> None:
        d, index = self._dir(key), self._index(name)
        doc = d / f"{_DOC_PREFIX}{name}{_DOC_SUFFIX}"
        with self._locks(key):
            pointer = self._read_pointer(d)
            if pointer is None:
                raise VersionConflict(f"state {key[:12]}… does not exist: no document can be attached to it")
            group = str(pointer.get("group") or "")
            growth = len(blob) - (doc.stat().st_size if doc.exists() else 0)
            self._usage.charge(group, 0, growth, quota)
            try:
                self._write(d, doc.name, blob)
            except BaseException:
                self._usage.charge(group, 0, -growth, None)
                raise
        index.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._write(index.parent, name, key.encode())

    def get_document(self, name: str) -> bytes | None:
        index = self._index(name)
        try:
            key = index.read_text().strip()
            return (self._dir(key) / f"{_DOC_PREFIX}{name}{_DOC_SUFFIX}").read_bytes()
        except (FileNotFoundError, ValueError):
            pass
        try:
            return (self.root / _LEGACY_DOCS / name[:2] / f"{name}.json").read_bytes()
        except FileNotFoundError:
            return None

    def delete_document(self, key: str, name: str) -> bool:
        d, index = self._dir(key), self._index(name)
        doc = d / f"{_DOC_PREFIX}{name}{_DOC_SUFFIX}"
        removed = False
        with self._locks(key):
            pointer = self._read_pointer(d)
            try:
                size = doc.stat().st_size
                doc.unlink()
                removed = True
                if pointer is not None:
                    self._usage.charge(str(pointer.get("group") or ""), 0, -size, None)
            except FileNotFoundError:
                pass
        for path in (index, self.root / _LEGACY_DOCS / name[:2] / f"{name}.json"):
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                pass
        return removed


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
        index = self.root / _INDEX_DIR
        for shard in (os.scandir(index) if index.is_dir() else ()):
            for entry in os.scandir(shard.path):
                if not is_storage_key(entry.name) or self.get_document(entry.name) is None:
                    os.unlink(entry.path)   # a leftover, or its state was deleted: the document went with it
                    removed += 1
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
        if self._lock_file is not None:
            self._lock_file.close()   # releases the lock
            self._lock_file = None


# --------------------------------------------------------------------------------------------------
