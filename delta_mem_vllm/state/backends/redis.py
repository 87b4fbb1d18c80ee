"""Redis backend: replicas sharing sessions, compare-and-set in Lua."""

from __future__ import annotations

import json
from typing import Any

from ..format import Snapshot, StateFormatError, decode_snapshot, encode_snapshot, validate_manifest
from ..keys import is_storage_key, validate_storage_key
from .base import ABSENT, Quota, QuotaExceeded, VersionConflict, _check_expected, record_revision

class RedisBackend:
    """Snapshots in Redis, one hash per key ``<prefix><key>`` (fields ``manifest``, ``data``,
    ``version``, ``revision``, ``group``, ``size``).

    Every write is one Lua script, atomic in Redis: a put or delete compares the revision, checks the
    group's quota, writes, and updates the group's usage (``<prefix>usage:<group>``, fields
    ``states`` and ``bytes``) in one step, so replicas sharing the server are safe without a lock
    service and a quota is never passed. Documents are strings ``<prefix>response:<name>`` listed in
    ``<prefix>docs:<key>``; the script that deletes a state deletes them. The scripts name keys they
    compute (usage, documents), so the server must be one Redis (or a cluster with every key of a
    prefix on one slot). "Durable on return" means acknowledged by the Redis server; surviving a
    Redis restart is Redis' own persistence configuration (AOF ``appendfsync always|everysec`` or
    RDB), to be set by the operator. Requires the ``redis`` package (extra ``delta-mem-vllm[redis]``).
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
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)
        self._current = client.register_script(_REVISION)
        self._put_doc = client.register_script(_PUT_DOCUMENT)
        self._delete_doc = client.register_script(_DELETE_DOCUMENT)

    shared = True   # other replicas write the same keys

    def __repr__(self) -> str:
        return f"RedisBackend({self.url!r}, prefix={self.prefix!r})"

    def _rkey(self, key: str) -> str:
        return self.prefix + validate_storage_key(key)

    def _limits(self, quota: Quota | None) -> list[Any]:
        if quota is None:
            return ["", -1, -1]
        return [quota.group, -1 if quota.max_states is None else quota.max_states,
                -1 if quota.max_bytes is None else quota.max_bytes]

    def put(self, key: str, snapshot: Snapshot, expect_revision: str | None = None,
            quota: Quota | None = None, expires_at: float | None = None) -> None:
        data, manifest = encode_snapshot(snapshot)
        blob = json.dumps(manifest, separators=(",", ":")).encode()
        found = self._put(keys=[self._rkey(key)], args=[
            "" if expect_revision is None else expect_revision, blob, data, int(snapshot.record.get("version", 0)),
            record_revision(snapshot.record), *self._limits(quota), self.prefix, key,
            "" if expires_at is None else repr(float(expires_at))])
        _raise_unless_ok(key, found, expect_revision)

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
        found = self._delete(keys=[self._rkey(key), self._docs(key)], args=[
            "" if expect_revision is None else expect_revision, self.prefix, key])
        if found in (b"gone", "gone"):
            return False
        _raise_unless_ok(key, found, expect_revision)
        return True

    def _docs(self, key: str) -> str:
        return f"{self.prefix}docs:{validate_storage_key(key)}"

    def _document(self, name: str) -> str:
        return f"{self.prefix}response:{validate_storage_key(name)}"

    def put_document(self, key: str, name: str, blob: bytes, quota: Quota | None = None) -> None:
        found = self._put_doc(keys=[self._rkey(key), self._docs(key), self._document(name)], args=[
            name, blob, self.prefix, self._limits(quota)[2]])
        if found in (b"<absent>", "<absent>"):
            raise VersionConflict(f"state {key[:12]}… does not exist: no document can be attached to it")
        _raise_unless_ok(key, found, None)

    def get_document(self, name: str) -> bytes | None:
        return self._client.get(self._document(name))

    def delete_document(self, key: str, name: str) -> bool:
        return bool(self._delete_doc(keys=[self._rkey(key), self._docs(key), self._document(name)],
                                     args=[name, self.prefix]))

    def usage(self, group: str) -> tuple[int, int]:
        states, nbytes = self._client.hmget(f"{self.prefix}usage:{group}", ["states", "bytes"])
        return int(states or 0), int(nbytes or 0)

    def group_keys(self, group: str) -> list[str]:
        return sorted(k.decode() if isinstance(k, bytes) else k for k in self._client.smembers(f"{self.prefix}members:{group}"))

    def expiring(self, until: float) -> list[str]:
        found = self._client.zrangebyscore(f"{self.prefix}expiry", "-inf", until)
        return sorted(k.decode() if isinstance(k, bytes) else k for k in found)

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

# ARGV[1] the expected revision: '' none, '<absent>' the key must not exist.
_COMPARE = _CURRENT + """
local cur = current()
if ARGV[1] ~= '' and ((ARGV[1] == '<absent>' and cur ~= nil) or (ARGV[1] ~= '<absent>' and cur ~= ARGV[1])) then
  if cur == nil then return '<absent>' end
  return cur
end
"""
_REVISION = _CURRENT + """
local cur = current()
if cur == nil then return '<absent>' end
return cur
"""
# ARGV: expect, manifest, data, version, revision, group, max states, max bytes (-1: none), prefix,
# storage key, expires at ('' never). A state keeps the group it was first counted in; one stored
# before groups is counted from now on. Indexes: <prefix>members:<group> (a set) and
# <prefix>expiry (a sorted set by expiry time).
_PUT = _COMPARE + """
local f = redis.call('HMGET', KEYS[1], 'group', 'size')
local group = f[1] or ARGV[6]
local usage = ARGV[9] .. 'usage:' .. group
local old = tonumber(f[2] or '0')
if cur ~= nil and not f[1] then
  old = redis.call('HSTRLEN', KEYS[1], 'manifest') + redis.call('HSTRLEN', KEYS[1], 'data')
  redis.call('HINCRBY', usage, 'states', 1)
  redis.call('HINCRBY', usage, 'bytes', old)
end
local size = string.len(ARGV[2]) + string.len(ARGV[3])
local u = redis.call('HMGET', usage, 'states', 'bytes')
local states, bytes = tonumber(u[1] or '0'), tonumber(u[2] or '0')
if cur == nil and tonumber(ARGV[7]) >= 0 and states + 1 > tonumber(ARGV[7]) then
  return 'quota:states:' .. ARGV[7] .. ':' .. states
end
if size > old and tonumber(ARGV[8]) >= 0 and bytes + size - old > tonumber(ARGV[8]) then
  return 'quota:bytes:' .. ARGV[8] .. ':' .. bytes
end
redis.call('HSET', KEYS[1], 'manifest', ARGV[2], 'data', ARGV[3], 'version', ARGV[4], 'revision', ARGV[5],
           'group', group, 'size', size)
if cur == nil then redis.call('HINCRBY', usage, 'states', 1) end
redis.call('HINCRBY', usage, 'bytes', size - old)
redis.call('SADD', ARGV[9] .. 'members:' .. group, ARGV[10])
if ARGV[11] == '' then
  redis.call('ZREM', ARGV[9] .. 'expiry', ARGV[10])
else
  redis.call('ZADD', ARGV[9] .. 'expiry', ARGV[11], ARGV[10])
end
return 'ok'
"""
# KEYS[2] the state's document list; ARGV: expect, prefix, storage key.
_DELETE = _COMPARE + """
if cur == nil then return 'gone' end
local f = redis.call('HMGET', KEYS[1], 'group', 'size')
local freed = tonumber(f[2] or '0')
for _, name in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  freed = freed + redis.call('STRLEN', ARGV[2] .. 'response:' .. name)
  redis.call('DEL', ARGV[2] .. 'response:' .. name)
end
redis.call('DEL', KEYS[2], KEYS[1])
redis.call('ZREM', ARGV[2] .. 'expiry', ARGV[3])
if f[1] then
  redis.call('HINCRBY', ARGV[2] .. 'usage:' .. f[1], 'states', -1)
  redis.call('HINCRBY', ARGV[2] .. 'usage:' .. f[1], 'bytes', -freed)
  redis.call('SREM', ARGV[2] .. 'members:' .. f[1], ARGV[3])
end
return 'ok'
"""
# KEYS: the state, its document list, the document; ARGV: name, blob, prefix, max bytes.
_PUT_DOCUMENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return '<absent>' end
local group = redis.call('HGET', KEYS[1], 'group')
local growth = string.len(ARGV[2]) - redis.call('STRLEN', KEYS[3])
if group then
  local usage = ARGV[3] .. 'usage:' .. group
  local bytes = tonumber(redis.call('HGET', usage, 'bytes') or '0')
  if growth > 0 and tonumber(ARGV[4]) >= 0 and bytes + growth > tonumber(ARGV[4]) then
    return 'quota:bytes:' .. ARGV[4] .. ':' .. bytes
  end
  redis.call('HINCRBY', usage, 'bytes', growth)
end
redis.call('SET', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return 'ok'
"""
_DELETE_DOCUMENT = """
local size = redis.call('STRLEN', KEYS[3])
local removed = redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[2], ARGV[1])
if removed == 1 then
  local group = redis.call('HGET', KEYS[1], 'group')
  if group then redis.call('HINCRBY', ARGV[2] .. 'usage:' .. group, 'bytes', -size) end
end
return removed
"""


def _raise_unless_ok(key: str, found: Any, expect: str | None) -> None:
    text = found.decode() if isinstance(found, bytes) else str(found)
    if text == "ok":
        return
    if text.startswith("quota:"):
        _, kind, limit, used = text.split(":")
        raise QuotaExceeded(kind, int(limit), int(used))
    _check_expected(key, None if text == ABSENT else text, expect)
    raise VersionConflict(f"state {key[:12]}…: unexpected answer {text!r} from the store")


def _found_revision(found: Any) -> str | None:
    text = found.decode() if isinstance(found, bytes) else str(found)
    return None if text == ABSENT else text
