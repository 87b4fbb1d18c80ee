"""Persistent backends (filesystem incl. kill -9 crash safety, real Redis, memory) and the tiered store."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from delta_mem_vllm.state import (
    ABSENT,
    CommitUnknown,
    FilesystemBackend,
    MemoryBackend,
    PersistError,
    Quota,
    QuotaExceeded,
    RedisBackend,
    Snapshot,
    StateFormatError,
    StateMismatchError,
    TieredStateStore,
    VersionConflict,
    storage_key,
)

try:
    from redis_server import RedisServer, redis_server_binary
except ImportError:  # tests/ imported as a package
    from tests.redis_server import RedisServer, redis_server_binary

REPO = Path(__file__).resolve().parents[1]
NAMES = [f"model.layers.{i}.self_attn" for i in range(4)]


def snap(value: float = 1.0, *, version: int = 1, fp: str = "fp", layers: int = 4, h: int = 1,
         commit: str | None = None) -> Snapshot:
    state = torch.full((layers, h, 8, 8), float(value))
    state[:, :, 0, 0] = torch.arange(layers * h, dtype=torch.float32).view(layers, h)  # layers distinguishable
    record = {"version": version, "value": value, **({"commit_id": commit} if commit else {})}
    return Snapshot(state=state, record=record, adapter_fingerprint=fp,
                    layer_names=[f"model.layers.{i}.self_attn" for i in range(layers)])


def key(i: int | str) -> str:
    return storage_key(None, f"s{i}")


def same(a: Snapshot | None, b: Snapshot) -> bool:
    return a is not None and torch.equal(a.state.cpu(), b.state.cpu()) and a.record == b.record


# --------------------------------------------------------------------------------------------------
# Filesystem backend
# --------------------------------------------------------------------------------------------------


def test_fs_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    be = FilesystemBackend(tmp_path)
    k = key(1)
    assert be.get(k) is None and not be.contains(k) and be.get_manifest(k) is None
    be.put(k, snap(1.0, version=1))
    be.put(k, snap(2.0, version=2))
    got = be.get(k)
    assert same(got, snap(2.0, version=2))
    assert be.get_manifest(k)["record"] == {"version": 2, "value": 2.0}
    d = tmp_path / k[:2] / k
    files = sorted(os.listdir(d))
    assert files[0] == "manifest.json" and len(files) == 2 and files[1].startswith("state-")  # old file removed
    pointer = json.loads((d / "manifest.json").read_text())
    assert pointer["data_file"] == files[1] and pointer["manifest"]["shape"] == [4, 1, 8, 8]
    assert stat.S_IMODE(os.stat(d / files[1]).st_mode) == 0o600  # session memory is private
    assert be.keys() == [k] and be.contains(k) and be.ping()
    assert be.delete(k) and not be.delete(k) and be.get(k) is None and be.keys() == []


def test_fs_keys_are_hashes_never_raw_ids(tmp_path: Path) -> None:
    be = FilesystemBackend(tmp_path / "root")
    with pytest.raises(ValueError):
        be.put("../../etc/passwd", snap())  # raw ids are refused outright
    with pytest.raises(ValueError):
        be.get("../x")
    weird = "..:..:etc:passwd"  # a *valid* session id that looks like a path
    k = storage_key("owner/../x", weird)
    be.put(k, snap())
    paths = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")]
    assert paths and all(p.startswith("root") for p in paths)
    assert not any("passwd" in p or "owner" in p for p in paths)
    assert list(tmp_path.iterdir()) == [tmp_path / "root"]


def test_fs_leftovers_ignored_and_cleaned(tmp_path: Path) -> None:
    be = FilesystemBackend(tmp_path)
    k, k2 = key(1), key(2)
    be.put(k, snap(3.0))
    d = tmp_path / k[:2] / k
    (d / ".tmp-abc123").write_bytes(b"half a file")
    (d / "state-deadbeef.safetensors").write_bytes(b"orphan from a crash")
    (tmp_path / ".tmp-root").write_bytes(b"x")
    grave = d.parent / f".del-{k}-1234"
    grave.mkdir()
    (grave / "manifest.json").write_text("{}")
    # a first write of k2 that crashed before its commit point: data file, no manifest
    d2 = tmp_path / k2[:2] / k2
    d2.mkdir(parents=True)
    (d2 / "state-0001.safetensors").write_bytes(b"complete or not, uncommitted")
    assert be.keys() == [k] and be.get(k2) is None and not be.contains(k2)
    assert same(be.get(k), snap(3.0))
    be2 = FilesystemBackend(tmp_path)  # restart: cleanup on start
    assert sorted(os.listdir(d)) == ["manifest.json", json.loads((d / "manifest.json").read_text())["data_file"]]
    assert not grave.exists() and not d2.exists() and not (tmp_path / ".tmp-root").exists()
    assert same(be2.get(k), snap(3.0)) and be2.keys() == [k]


def test_fs_corruption_is_an_error_not_a_zero(tmp_path: Path) -> None:
    be = FilesystemBackend(tmp_path)
    k = key(1)
    be.put(k, snap(5.0))
    d = tmp_path / k[:2] / k
    data_file = d / json.loads((d / "manifest.json").read_text())["data_file"]
    original = data_file.read_bytes()

    raw = bytearray(original)
    raw[len(raw) // 2] ^= 0x40
    data_file.write_bytes(bytes(raw))
    with pytest.raises(StateFormatError, match="checksum"):
        be.get(k)
    data_file.write_bytes(original[:-16])
    with pytest.raises(StateFormatError, match="truncated"):
        be.get(k)
    data_file.unlink()
    with pytest.raises(StateFormatError, match="missing"):
        be.get(k)
    data_file.write_bytes(original)
    assert same(be.get(k), snap(5.0))

    manifest = (d / "manifest.json").read_bytes()
    (d / "manifest.json").write_bytes(manifest[: len(manifest) // 2])
    with pytest.raises(StateFormatError, match="corrupted state manifest"):
        be.get(k)
    (d / "manifest.json").write_bytes(manifest.replace(b'"version":1', b'"version":9'))
    with pytest.raises(StateFormatError, match="manifest checksum"):
        be.get(k)
    with pytest.raises(StateFormatError):
        be.get_manifest(k)
    # the store surfaces it too, and counts it
    store = TieredStateStore(be)
    with pytest.raises(StateFormatError):
        store.get(k)
    assert store.stats()["restore_failures"] == 1 and store.tier_of(k) == "persistent"


CRASH_WRITER = textwrap.dedent(
    """
    import sys, torch
    from delta_mem_vllm.state import FilesystemBackend, Snapshot
    root, key, v = sys.argv[1], sys.argv[2], int(sys.argv[3])  # versions continue across runs
    be = FilesystemBackend(root)
    names = [f"model.layers.{i}.self_attn" for i in range(36)]
    print("ready", flush=True)
    while True:
        v += 1
        state = torch.full((36, 4, 8, 8), float(v))
        be.put(key, Snapshot(state, {"version": v, "pad": "x" * (v % 97)}, "fp", names))
        print(v, flush=True)  # acknowledged: put() returned, so it must survive
    """
)


def test_fs_kill_9_leaves_old_or_new_complete_snapshot(tmp_path: Path) -> None:
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    k = key("crash")
    root = tmp_path / "store"
    last_seen = 0
    for run in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(root), k, str(last_seen)], stdout=subprocess.PIPE, env=env
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        acked = last_seen  # durable before this run
        target = last_seen + rng.choice([0, 1, 3, 10, 25])  # +0: kill during this process' first write
        while acked < target:
            line = proc.stdout.readline()
            assert line, "writer died"
            acked = int(line)
        time.sleep(rng.uniform(0, 0.004))
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait()
        for line in rest.split():
            acked = int(line)
        assert proc.returncode == -signal.SIGKILL

        be = FilesystemBackend(root)  # "restart": cleans leftovers of the killed write
        got = be.get(k)  # verifies both checksums
        if got is None:
            assert acked == 0  # only a never-acknowledged first write may be absent
            continue
        v = got.record["version"]
        assert v >= acked, f"acknowledged version {acked} lost (found {v})"
        assert v <= acked + 1  # at most the one write in flight
        assert torch.equal(got.state, torch.full((36, 4, 8, 8), float(v))), "mixed or torn state"
        assert got.record["pad"] == "x" * (v % 97)
        files = os.listdir(root / k[:2] / k)
        assert sorted(files)[0] == "manifest.json" and len(files) == 2, files
        last_seen = v
    assert last_seen > 0


# --------------------------------------------------------------------------------------------------
# Redis backend (a real redis-server)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory: pytest.TempPathFactory):
    if redis_server_binary() is None:
        pytest.skip("redis-server binary not found (apt-get install redis-server)")
    pytest.importorskip("redis", reason="redis-py not installed (pip install 'delta-mem-vllm[redis]')")
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


def test_redis_round_trip_delete_keys(redis_srv: RedisServer) -> None:
    be = RedisBackend(redis_srv.url, prefix="t1:")
    other = RedisBackend(redis_srv.url, prefix="t2:")
    assert be.ping()
    k1, k2 = key(1), key(2)
    assert be.get(k1) is None and not be.contains(k1) and be.get_manifest(k1) is None
    be.put(k1, snap(1.0, version=1))
    be.put(k1, snap(2.0, version=2))
    be.put(k2, snap(3.0, h=4))
    other.put(k1, snap(9.0))
    assert same(be.get(k1), snap(2.0, version=2)) and same(be.get(k2), snap(3.0, h=4))
    assert be.get_manifest(k1)["record"]["version"] == 2
    assert be.keys() == sorted([k1, k2]) and other.keys() == [k1]  # prefixes isolate deployments
    assert be.delete(k1) and not be.delete(k1) and be.get(k1) is None and be.keys() == [k2]
    assert same(other.get(k1), snap(9.0))
    with pytest.raises(ValueError):
        be.put("../raw-id", snap())
    be.close()
    other.close()


def test_redis_corruption_detected(redis_srv: RedisServer) -> None:
    import redis

    be = RedisBackend(redis_srv.url, prefix="t3:")
    raw = redis.Redis.from_url(redis_srv.url)
    k = key(1)
    be.put(k, snap(1.0))
    data = raw.hget("t3:" + k, "data")
    raw.hset("t3:" + k, "data", data[:-3] + b"\x00\x00\x00")
    with pytest.raises(StateFormatError, match="checksum"):
        be.get(k)
    raw.hdel("t3:" + k, "data")
    with pytest.raises(StateFormatError, match="incomplete"):
        be.get(k)
    raw.hset("t3:" + k, mapping={"manifest": b"{not json", "data": data})
    with pytest.raises(StateFormatError, match="corrupted state manifest"):
        be.get(k)
    raw.close()


def test_redis_store_and_ping_false_after_stop(tmp_path: Path) -> None:
    if redis_server_binary() is None:
        pytest.skip("redis-server binary not found (apt-get install redis-server)")
    pytest.importorskip("redis")
    srv = RedisServer(tmp_path / "r").start()
    try:
        store = TieredStateStore(RedisBackend(srv.url, socket_timeout=1.0), device_capacity=1, host_capacity=1)
        for i in range(3):
            store.put(key(i), snap(float(i)))
        restarted = TieredStateStore(RedisBackend(srv.url, socket_timeout=1.0))
        assert restarted.keys() == sorted(key(i) for i in range(3))
        assert same(restarted.get(key(0)), snap(0.0)) and restarted.stats()["restores"] == 1
        assert store.ping()
    finally:
        srv.stop()
    t0 = time.monotonic()
    assert not store.ping() and not store.backend.ping()
    assert time.monotonic() - t0 < 5
    with pytest.raises(PersistError):
        store.put(key(0), snap(7.0))
    assert store.stats()["persist_failures"] == 1
    # a resident copy is not served either: another replica may have committed since (shared backend)
    for call in (lambda: store.get(key(0)), lambda: store.get(key(2)), store.keys, lambda: store.tier_of(key(0)),
                 lambda: store.delete(key(2))):
        with pytest.raises(PersistError):  # backend down → one error type (HTTP 503), never a bare redis error
            call()
    stats = store.stats()   # the failed delete removed nothing (tier_of itself asks the backend: it is down)
    assert stats["deletes"] == 0 and stats["device_resident"] + stats["host_resident"] == 2


# --------------------------------------------------------------------------------------------------
# Tiered store
# --------------------------------------------------------------------------------------------------


def tiers(store: TieredStateStore, n: int) -> list[str | None]:
    return [store.tier_of(key(i)) for i in range(n)]


@pytest.mark.parametrize("backend_kind", ["memory", "fs"])
def test_lru_device_to_host_to_backend_and_restore(tmp_path: Path, backend_kind: str) -> None:
    be = MemoryBackend() if backend_kind == "memory" else FilesystemBackend(tmp_path)
    events: list[tuple[str, dict]] = []
    store = TieredStateStore(be, device_capacity=2, host_capacity=2, on_event=lambda n, i: events.append((n, i)))
    for i in range(5):
        store.put(key(i), snap(float(i)))
    # LRU: device holds the 2 newest, host the next 2, the oldest only in the backend
    assert tiers(store, 5) == ["persistent", "host", "host", "device", "device"]
    s = store.stats()
    assert (s["device_resident"], s["host_resident"], s["persists"], s["evictions_device"], s["evictions_host"]) == (2, 2, 5, 3, 1)

    assert same(store.get(key(1)), snap(1.0))  # host → device; LRU device entry (3) → host
    assert tiers(store, 5) == ["persistent", "device", "host", "host", "device"]
    assert store.stats()["hits_host"] == 1 and store.stats()["restores"] == 0

    got = store.get(key(0))  # transparent restore; device LRU (4) → host; host LRU (2) dropped from memory
    assert same(got, snap(0.0)) and got.state.device == torch.device("cpu")
    assert tiers(store, 5) == ["device", "device", "persistent", "host", "host"]
    s = store.stats()
    assert s["restores"] == 1 and s["last_restore_latency_s"] is not None and s["last_restore_latency_s"] >= 0
    assert store.get(key(1)) is not None and store.stats()["hits_device"] == 1  # device hit refreshes recency
    store.put(key(5), snap(5.0))
    assert store.tier_of(key(0)) == "host" and store.tier_of(key(1)) == "device"  # 0 was LRU, not 1

    names = [n for n, _ in events]
    assert names.count("persist") == 6 and names.count("restore") == 1 and "promote" in names
    assert {i["from"] for n, i in events if n == "evict"} == {"device", "host"}
    persist = next(i for n, i in events if n == "persist")
    assert persist["latency_s"] >= 0 and persist["bytes"] == 4 * 64 * 4


def test_stats_numbers_and_bytes() -> None:
    store = TieredStateStore(MemoryBackend(), device_capacity=3, host_capacity=10)
    assert store.get(key(0)) is None and store.stats()["misses"] == 1
    for i in range(5):
        store.put(key(i), snap(float(i), h=2))
    per = 4 * 2 * 8 * 8 * 4
    s = store.stats()
    assert s["device_resident"] == 3 and s["host_resident"] == 2
    assert s["device_state_bytes"] == 3 * per and s["host_state_bytes"] == 2 * per and s["state_bytes"] == 5 * per
    assert s["dirty"] == 0 and s["persists"] == 5 and s["persist_failures"] == 0
    assert s["backend"] == "MemoryBackend" and s["device"] == "cpu"
    assert isinstance(s["last_persist_latency_s"], float)
    json.dumps(s)  # exportable as is


def test_returned_and_given_snapshots_are_isolated() -> None:
    store = TieredStateStore(None)
    s = snap(1.0)
    store.put(key(0), s)
    s.state.add_(100.0)  # caller reuses its tensor (e.g. an engine slot)
    s.record["version"] = 99
    got = store.get(key(0))
    assert same(got, snap(1.0))
    got.state.mul_(0.0)  # engine writes into its initial state in place
    got.record["value"] = "mutated"
    assert same(store.get(key(0)), snap(1.0))


def test_delete_from_every_tier(tmp_path: Path) -> None:
    be = FilesystemBackend(tmp_path)
    store = TieredStateStore(be, device_capacity=1, host_capacity=1)
    for i in range(3):
        store.put(key(i), snap(float(i)))
    assert tiers(store, 3) == ["persistent", "host", "device"]
    events: list[str] = []
    store._on_event = lambda n, i: events.append(n)  # noqa: SLF001 - hook for the test
    for i in range(3):
        assert store.delete(key(i))
        assert store.tier_of(key(i)) is None and not store.contains(key(i)) and store.get(key(i)) is None
        assert not be.contains(key(i))
    assert not store.delete(key(0)) and store.keys() == [] and be.keys() == []
    assert events.count("delete") == 3 and store.stats()["deletes"] == 3


def test_survives_restart_over_same_directory(tmp_path: Path) -> None:
    store = TieredStateStore(FilesystemBackend(tmp_path), device_capacity=2)
    for i in range(4):
        store.put(key(i), snap(float(i), version=i + 1))
    store.close()
    again = TieredStateStore(FilesystemBackend(tmp_path), device_capacity=2)
    assert again.keys() == sorted(key(i) for i in range(4))
    assert tiers(again, 4) == ["persistent"] * 4
    assert again.peek_record(key(3)) == {"version": 4, "value": 3.0} and again.tier_of(key(3)) == "persistent"
    for i in range(4):
        assert same(again.get(key(i)), snap(float(i), version=i + 1))
    assert again.stats()["restores"] == 4


def test_without_backend_host_never_drops_data() -> None:
    store = TieredStateStore(None, device_capacity=1, host_capacity=1)
    for i in range(5):
        store.put(key(i), snap(float(i)))
    s = store.stats()
    assert s["device_resident"] == 1 and s["host_resident"] == 4 and s["host_over_capacity"] == 3
    assert s["dirty"] == 5 and store.flush() == 0 and store.ping()
    for i in range(5):
        assert same(store.get(key(i)), snap(float(i)))
    assert store.keys() == sorted(key(i) for i in range(5))
    assert store.peek_record(key(0)) == {"version": 1, "value": 0.0}


def test_write_back_mode_flushes(tmp_path: Path) -> None:
    be = FilesystemBackend(tmp_path)
    store = TieredStateStore(be, device_capacity=1, host_capacity=1, write_through=False)
    for i in range(4):
        store.put(key(i), snap(float(i)))
    assert be.keys() == [] and store.stats()["host_resident"] == 3  # dirty: kept, not dropped
    assert store.flush() == 4 and store.flush() == 0
    assert be.keys() == sorted(key(i) for i in range(4))
    s = store.stats()
    assert s["dirty"] == 0 and s["host_resident"] == 1 and s["host_over_capacity"] == 0


def test_expectations_enforced_on_put_and_restore(tmp_path: Path) -> None:
    FilesystemBackend(tmp_path).put(key(0), snap(1.0, fp="old-adapter"))
    store = TieredStateStore(FilesystemBackend(tmp_path), expect_adapter_fingerprint="new-adapter", expect_shape=(1, 8, 8))
    with pytest.raises(StateMismatchError, match="old-adapter.*new-adapter"):
        store.get(key(0))  # restart with another adapter: refuse, don't serve a foreign memory
    with pytest.raises(StateMismatchError, match="old-adapter"):
        store.put(key(1), snap(1.0, fp="old-adapter"))
    with pytest.raises(StateMismatchError, match="shape"):
        store.put(key(1), snap(1.0, fp="new-adapter", h=4))
    store.put(key(1), snap(1.0, fp="new-adapter"))
    assert store.tier_of(key(1)) == "device"


def test_invalid_puts_change_nothing() -> None:
    store = TieredStateStore(MemoryBackend())
    store.put(key(0), snap(1.0))
    bad = snap(2.0)
    bad.state[0, 0, 1, 1] = float("nan")
    with pytest.raises(StateFormatError, match="NaN"):
        store.put(key(0), bad)
    with pytest.raises(ValueError, match="storage key"):
        store.put("s0", snap(1.0))
    assert same(store.get(key(0)), snap(1.0)) and store.stats()["persists"] == 1


class FlakyBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.fail = False

    def put(self, key: str, snapshot: Snapshot, *args, **kwargs) -> None:
        if self.fail:
            raise OSError("disk full")
        super().put(key, snapshot, *args, **kwargs)


def test_persist_failure_commits_nothing() -> None:
    be = FlakyBackend()
    events: list[tuple[str, dict]] = []
    store = TieredStateStore(be, on_event=lambda n, i: events.append((n, i)))
    store.put(key(0), snap(1.0, version=1))
    be.fail = True
    with pytest.raises(PersistError, match="disk full"):
        store.put(key(0), snap(2.0, version=2))
    assert same(store.get(key(0)), snap(1.0, version=1)) and same(be.get(key(0)), snap(1.0, version=1))
    with pytest.raises(PersistError):
        store.put(key(1), snap(3.0))
    assert store.tier_of(key(1)) is None
    assert store.stats()["persist_failures"] == 2
    assert [n for n, _ in events].count("persist_failure") == 2


def test_event_callback_errors_do_not_break_the_store() -> None:
    def bad(name: str, info: dict) -> None:
        raise RuntimeError("metrics down")

    store = TieredStateStore(MemoryBackend(), on_event=bad, device_capacity=1)
    store.put(key(0), snap(1.0))
    store.put(key(1), snap(2.0))
    assert same(store.get(key(0)), snap(1.0))


def test_concurrent_sessions_no_crosstalk(tmp_path: Path) -> None:
    store = TieredStateStore(FilesystemBackend(tmp_path, fsync=False), device_capacity=3, host_capacity=3)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for step in range(30):
                k = key(f"{t}-{step % 4}")
                value = float(t * 1000 + step)
                store.put(k, snap(value, version=step))
                got = store.get(k)
                assert got is not None and got.record["version"] == step and got.state[0, 0, 1, 1].item() == value
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    for t in range(6):
        for j in range(4):
            last = max(s for s in range(30) if s % 4 == j)
            assert same(store.get(key(f"{t}-{j}")), snap(float(t * 1000 + last), version=last))
    assert len(store.keys()) == 24


# --------------------------------------------------------------------------------------------------
# Conditional writes: replicas sharing a backend
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "filesystem", "redis"])
def any_backend(request, tmp_path):
    if request.param == "memory":
        yield MemoryBackend()
    elif request.param == "filesystem":
        yield FilesystemBackend(tmp_path / "fs")
    else:
        if redis_server_binary() is None:
            pytest.skip("redis-server binary not found (apt-get install redis-server)")
        srv = RedisServer(tmp_path / "r").start()
        yield RedisBackend(srv.url)
        srv.stop()


def test_conditional_puts_and_deletes(any_backend):
    be = any_backend
    be.put(key(0), snap(1.0, version=0, commit="c0"), expect_revision=ABSENT)
    with pytest.raises(VersionConflict):
        be.put(key(0), snap(2.0, version=0, commit="x0"), expect_revision=ABSENT)   # created by someone else
    be.put(key(0), snap(3.0, version=1, commit="c1"), expect_revision="0-c0")
    assert be.revision(key(0)) == "1-c1" and be.revision(key(1)) is None
    with pytest.raises(VersionConflict):
        be.put(key(0), snap(4.0, version=1, commit="x1"), expect_revision="0-c0")   # the loser of a race
    with pytest.raises(VersionConflict):
        be.put(key(1), snap(4.0, version=1, commit="x1"), expect_revision="0-c0")   # deleted meanwhile
    assert same(be.get(key(0)), snap(3.0, version=1, commit="c1")) and be.get(key(1)) is None   # losers changed nothing
    with pytest.raises(VersionConflict):
        be.delete(key(0), expect_revision="0-c0")
    with pytest.raises(VersionConflict):
        be.delete(key(0), expect_revision="1-other")    # the same version from another commit
    assert be.delete(key(0), expect_revision="1-c1") and be.revision(key(0)) is None
    be.put(key(2), snap(5.0, version=7))                 # unconditional, and a record without a commit id
    assert be.revision(key(2)) == "7"
    be.put(key(2), snap(6.0, version=8, commit="c8"), expect_revision="7")


def test_a_version_that_repeats_is_another_commit(any_backend):
    """A session deleted and created again counts its versions from 0 again: a writer holding the
    old incarnation's version 1 must not commit over the new incarnation's version 1."""
    be = any_backend
    be.put(key(0), snap(1.0, version=0, commit="old0"), expect_revision=ABSENT)
    be.put(key(0), snap(2.0, version=1, commit="old1"), expect_revision="0-old0")
    assert be.delete(key(0))
    be.put(key(0), snap(3.0, version=0, commit="new0"), expect_revision=ABSENT)
    be.put(key(0), snap(4.0, version=1, commit="new1"), expect_revision="0-new0")
    with pytest.raises(VersionConflict):
        be.put(key(0), snap(9.0, version=2, commit="old2"), expect_revision="1-old1")
    with pytest.raises(VersionConflict):
        be.delete(key(0), expect_revision="1-old1")
    assert same(be.get(key(0)), snap(4.0, version=1, commit="new1"))


@pytest.fixture
def redis_url(tmp_path):
    """A throw-away redis-server for tests that share it between two stores (two replicas)."""
    if redis_server_binary() is None:
        pytest.skip("redis-server binary not found (apt-get install redis-server)")
    srv = RedisServer(tmp_path / "r").start()
    yield srv.url
    srv.stop()


def test_a_shared_backend_never_serves_a_stale_resident_state(redis_url):
    """Replica A holds a revision resident; B commits through the same Redis: A's next read is B's
    commit, and A's commit from its old copy is refused, even when B's commit has the same version
    (B deleted the session and created it again)."""
    a, b = (TieredStateStore(RedisBackend(redis_url)) for _ in range(2))
    a.put(key(0), snap(1.0, version=1, commit="a1"), expect_revision=ABSENT)
    assert same(a.get(key(0)), snap(1.0, version=1, commit="a1"))
    assert same(b.get(key(0)), snap(1.0, version=1, commit="a1"))
    b.put(key(0), snap(2.0, version=2, commit="b2"), expect_revision="1-a1")
    with pytest.raises(VersionConflict):
        a.put(key(0), snap(9.0, version=2, commit="a2"), expect_revision="1-a1")
    assert same(a.get(key(0)), snap(2.0, version=2, commit="b2")) and a.stats()["restores"] == 1
    b.put(key(0), snap(3.0, version=3, commit="b3"), expect_revision="2-b2")
    assert same(a.get(key(0)), snap(3.0, version=3, commit="b3")) and a.stats()["stale_drops"] == 1
    assert b.delete(key(0)) and a.get(key(0)) is None               # deleted elsewhere: gone here too
    # recreated elsewhere up to the version A holds: A neither serves nor overwrites its copy
    a.put(key(1), snap(1.0, version=1, commit="a1"), expect_revision=ABSENT)
    assert same(a.get(key(1)), snap(1.0, version=1, commit="a1"))
    assert b.delete(key(1))
    b.put(key(1), snap(5.0, version=0, commit="b0"), expect_revision=ABSENT)
    b.put(key(1), snap(6.0, version=1, commit="b1"), expect_revision="0-b0")
    assert same(a.get(key(1)), snap(6.0, version=1, commit="b1"))
    with pytest.raises(VersionConflict):
        a.put(key(1), snap(9.0, version=2, commit="a2"), expect_revision="1-a1")
    # states written before the revision (or any version) field compare by their manifest's record
    rb = b.backend
    rb.put(key(5), snap(1.0, version=4))
    rb._client.hdel(rb._rkey(key(5)), "version", "revision")
    assert rb.revision(key(5)) == "4"
    rb.put(key(5), snap(2.0, version=5, commit="c5"), expect_revision="4")
    rb._client.hdel(rb._rkey(key(5)), "version", "revision")
    assert rb.revision(key(5)) == "5-c5"
    # a replica of an older release writes `version` alone: the stale `revision` beside it is ignored
    rb._client.hset(rb._rkey(key(5)), mapping={"version": 6, "revision": "5-c5"})
    assert rb.revision(key(5)) == "6"
    with pytest.raises(VersionConflict):
        rb.put(key(5), snap(2.0, version=6, commit="c6"), expect_revision="5-c5")


def _lands_then_fails(backend, *, unreadable: bool = False):
    """Faults after the commit point: the write lands, the call raises (a Redis reply lost after the
    script ran), and with `unreadable` the read-back fails too. Armed by setting `.armed`."""
    put, revision = backend.put, backend.revision

    def failing_put(key, snapshot, *args, **kwargs):
        put(key, snapshot, *args, **kwargs)
        if backend.armed:
            raise ConnectionError("connection lost after the write")

    def failing_revision(key):
        if backend.armed and unreadable:
            raise ConnectionError("store unreachable")
        return revision(key)

    backend.armed, backend.put, backend.revision = False, failing_put, failing_revision
    return backend


class _FsyncFailsAfterRename(FilesystemBackend):
    """The directory fsync after the manifest's rename fails: the new manifest is in place."""
    armed = False

    def _write(self, d, name, payload):
        super()._write(d, name, payload)
        if self.armed and name == "manifest.json":
            raise OSError(5, "Input/output error")


@pytest.mark.parametrize("kind", ["filesystem", "redis"])
def test_a_commit_that_landed_despite_an_error_is_reported_committed(kind, tmp_path):
    srv = None
    if kind == "filesystem":
        be = _FsyncFailsAfterRename(tmp_path / "fs")
    else:
        if redis_server_binary() is None:
            pytest.skip("redis-server binary not found (apt-get install redis-server)")
        srv = RedisServer(tmp_path / "r").start()
        be = _lands_then_fails(RedisBackend(srv.url))
    try:
        store = TieredStateStore(be)
        store.put(key(0), snap(1.0, version=1, commit="c1"), expect_revision=ABSENT)
        be.armed = True
        store.put(key(0), snap(2.0, version=2, commit="c2"), expect_revision="1-c1")    # no error: it landed
        assert same(store.get(key(0)), snap(2.0, version=2, commit="c2"))
        assert be.revision(key(0)) == "2-c2" and store.stats()["persist_failures"] == 1
    finally:
        if srv is not None:
            srv.stop()


def test_a_commit_whose_outcome_cannot_be_read_back_is_unknown_and_one_that_failed_is_not():
    be = _lands_then_fails(MemoryBackend(), unreadable=True)
    store = TieredStateStore(be)
    store.put(key(0), snap(1.0, version=1, commit="c1"), expect_revision=ABSENT)
    be.armed = True
    with pytest.raises(CommitUnknown):
        store.put(key(0), snap(2.0, version=2, commit="c2"), expect_revision="1-c1")
    be.armed = False
    assert store.tier_of(key(0)) == "persistent"          # the resident copy is no longer trusted
    assert same(store.get(key(0)), snap(2.0, version=2, commit="c2"))   # it had landed

    refusing = FlakyBackend()
    store = TieredStateStore(refusing)
    store.put(key(0), snap(1.0, version=1, commit="c1"), expect_revision=ABSENT)
    refusing.fail = True
    with pytest.raises(PersistError) as e:
        store.put(key(0), snap(2.0, version=2, commit="c2"), expect_revision="1-c1")
    assert not isinstance(e.value, CommitUnknown)
    assert store.tier_of(key(0)) == "device" and same(store.get(key(0)), snap(1.0, version=1, commit="c1"))


def doc_name(i: int) -> str:
    return f"{i:064x}"


def test_documents_go_with_their_state_and_every_byte_is_counted(any_backend, tmp_path):
    be = any_backend
    q = Quota("alice")
    be.put(key(0), snap(1.0, version=0, commit="c0"), expect_revision=ABSENT, quota=q)
    first = be.usage("alice")[1]
    be.put(key(1), snap(1.0, version=0, commit="c0"), expect_revision=ABSENT, quota=q)
    states, state_bytes = be.usage("alice")
    assert states == 2 and first > 4 * 8 * 8 * 4                  # a state of 4x8x8 fp32 and its manifest
    be.put_document(key(0), doc_name(1), b"x" * 1000, q)
    be.put_document(key(0), doc_name(2), b"y" * 500, q)
    be.put_document(key(1), doc_name(3), b"z" * 100, q)
    assert be.usage("alice") == (2, state_bytes + 1600)
    assert be.get_document(doc_name(1)) == b"x" * 1000 and be.get_document(doc_name(9)) is None
    be.put_document(key(0), doc_name(2), b"w" * 200, q)             # replaced: counted once
    assert be.usage("alice") == (2, state_bytes + 1300)
    assert be.delete_document(key(0), doc_name(2)) and not be.delete_document(key(0), doc_name(2))
    assert be.usage("alice") == (2, state_bytes + 1100)
    with pytest.raises(VersionConflict):
        be.put_document(key(7), doc_name(4), b"orphan", q)            # no such state
    be.put(key(0), snap(2.0, version=1, commit="c1"), expect_revision="0-c0", quota=q)
    assert be.usage("alice")[0] == 2 and abs(be.usage("alice")[1] - state_bytes - 1100) < 16   # the new manifest
    assert be.delete(key(0), expect_revision="1-c1")
    assert be.get_document(doc_name(1)) is None                      # deleted with its state
    assert be.usage("alice") == (1, state_bytes - first + 100)
    assert be.delete(key(1)) and be.get_document(doc_name(3)) is None
    assert be.usage("alice") == (0, 0) and be.usage("bob") == (0, 0)


def test_quotas_refuse_a_write_and_change_nothing(any_backend):
    be = any_backend
    small = snap(1.0, version=0, commit="c0")
    be.put(key(0), small, expect_revision=ABSENT, quota=Quota("alice", max_states=2))
    one_state = be.usage("alice")[1]
    be.put(key(1), small, expect_revision=ABSENT, quota=Quota("alice", max_states=2))
    with pytest.raises(QuotaExceeded) as e:
        be.put(key(2), small, expect_revision=ABSENT, quota=Quota("alice", max_states=2))
    assert e.value.kind == "states" and e.value.limit == 2 and not be.contains(key(2))
    be.put(key(2), small, expect_revision=ABSENT, quota=Quota("bob", max_states=2))   # another group
    be.put(key(0), snap(2.0, version=1, commit="c1"), expect_revision="0-c0", quota=Quota("alice"))
    used = be.usage("alice")[1]
    assert abs(used - 2 * one_state) < 16
    q = Quota("alice", max_bytes=used + 100)
    with pytest.raises(QuotaExceeded) as e:
        be.put_document(key(0), doc_name(1), b"x" * 101, q)
    assert e.value.kind == "bytes" and be.get_document(doc_name(1)) is None
    be.put_document(key(0), doc_name(1), b"x" * 100, q)
    with pytest.raises(QuotaExceeded):
        be.put(key(0), snap(3.0, version=2, commit="c2", layers=5), expect_revision="1-c1", quota=q)   # grows
    assert be.revision(key(0)) == "1-c1"
    assert be.usage("alice") == (2, used + 100)
    assert be.delete(key(1))
    be.put(key(0), snap(3.0, version=2, commit="c2", layers=5), expect_revision="1-c1", quota=q)


def test_filesystem_usage_is_counted_again_on_start_and_dangling_index_entries_go(tmp_path):
    be = FilesystemBackend(tmp_path / "fs")
    q = Quota("alice")
    be.put(key(0), snap(1.0, version=0, commit="c0"), expect_revision=ABSENT, quota=q)
    be.put_document(key(0), doc_name(1), b"x" * 10, q)
    be.put(key(1), snap(1.0, version=0, commit="c0"))                  # no group
    used = be.usage("alice")
    again = FilesystemBackend(tmp_path / "fs")
    assert again.usage("alice") == used and again.usage("")[0] == 1
    again.put(key(1), snap(2.0, version=1, commit="c1"), quota=q)      # joins the writer's group
    assert again.usage("alice")[0] == 2 and again.usage("") == (0, 0)
    shutil.rmtree(tmp_path / "fs" / key(0)[:2] / key(0))                # the state vanished under its document
    third = FilesystemBackend(tmp_path / "fs")
    assert third.get_document(doc_name(1)) is None
    assert not (tmp_path / "fs" / "documents" / doc_name(1)[:2] / doc_name(1)).exists()


def test_group_and_expiry_indexes(any_backend):
    be = any_backend
    be.put(key(0), snap(1.0, version=0, commit="a"), expect_revision=ABSENT, quota=Quota("alice"), expires_at=100.0)
    be.put(key(1), snap(1.0, version=0, commit="a"), expect_revision=ABSENT, quota=Quota("alice"))
    be.put(key(2), snap(1.0, version=0, commit="a"), expect_revision=ABSENT, quota=Quota("bob"), expires_at=50.0)
    assert be.group_keys("alice") == sorted([key(0), key(1)]) and be.group_keys("bob") == [key(2)]
    assert be.expiring(60.0) == [key(2)] and be.expiring(100.0) == sorted([key(0), key(2)])
    be.put(key(0), snap(2.0, version=1, commit="b"), expect_revision="0-a", quota=Quota("alice"), expires_at=200.0)
    be.put(key(2), snap(2.0, version=1, commit="b"), expect_revision="0-a", quota=Quota("bob"))   # no TTL now
    assert be.expiring(150.0) == [] and be.expiring(200.0) == [key(0)]
    assert be.delete(key(0))
    assert be.group_keys("alice") == [key(1)] and be.expiring(1e9) == []


def test_a_resident_copy_deleted_elsewhere_is_not_reported_stored(redis_url):
    a, b = (TieredStateStore(RedisBackend(redis_url)) for _ in range(2))
    a.put(key(0), snap(1.0, version=1, commit="a1"), expect_revision=ABSENT)
    assert a.tier_of(key(0)) == "device"
    assert b.delete(key(0))
    assert a.tier_of(key(0)) is None and not a.contains(key(0))


def test_filesystem_leftovers_of_documents_go_on_start_and_a_root_has_one_server(tmp_path):
    be = FilesystemBackend(tmp_path / "fs", exclusive=True)
    be.put(key(0), snap(1.0, version=0, commit="a"), quota=Quota("alice"))
    be.put_document(key(0), doc_name(1), b"doc", Quota("alice"))
    state_dir = tmp_path / "fs" / key(0)[:2] / key(0)
    index_dir = tmp_path / "fs" / "documents" / doc_name(1)[:2]
    (state_dir / ".tmp-crashed").write_bytes(b"half a document")     # a crash mid-write, in both places
    (index_dir / ".tmp-crashed").write_bytes(b"half an index entry")
    with pytest.raises(RuntimeError, match="in use by another process"):
        FilesystemBackend(tmp_path / "fs", exclusive=True)
    be.close()
    again = FilesystemBackend(tmp_path / "fs", exclusive=True)
    assert not (state_dir / ".tmp-crashed").exists() and not (index_dir / ".tmp-crashed").exists()
    assert again.get_document(doc_name(1)) == b"doc"
    again.close()
