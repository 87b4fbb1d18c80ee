"""Several replicas sharing sessions through one Redis: real server processes on loopback and a real
`redis-server` (AOF, fsync always). Any replica may serve any turn; a commit names the version it
started from, so of two racing turns on one session the later is a 409 that leaves nothing behind.

Replicas run with two device slots and two host slots each, so sessions are evicted and restored
all the time, and resident copies go stale whenever the other replica commits.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import torch

from delta_mem_vllm.state.keys import is_storage_key
from tests.redis_server import RedisServer, redis_server_binary
from tests.server.conftest import ProcServer, export_state

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="redis-server not installed")


def _replica_args(model_dir, redis_url: str) -> list[str]:
    return ["--demo", "--demo-tiny", "--demo-dir", str(model_dir.parent), "--served-model-name", "tiny", "--engine", "torch",
            "--state-backend", "redis", "--redis-url", redis_url, "--redis-prefix", "mr:",
            "--device-pool-size", "2", "--host-pool-size", "2", "--record-written-tokens",
            "--session-wait-timeout", "10", "--shutdown-grace", "5", "--api-keys", "key-1,key-2"]


def _client(url: str, key: str = "key-1") -> httpx.Client:
    return httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"})


class Cluster:
    def __init__(self, tiny_paths, tmp_path, extra: tuple[str, ...] = (), durable: bool = True) -> None:
        self.tmp = tmp_path
        self.redis = RedisServer(tmp_path / "redis", durable=durable).start()
        self.args = _replica_args(tiny_paths[0], self.redis.url) + list(extra)
        self.replicas = [self.start(i) for i in range(2)]
        self.http = [_client(r.url) for r in self.replicas]

    def start(self, i: int) -> ProcServer:
        return ProcServer(self.args, self.tmp / f"replica-{i}.log").start()

    def restart(self, i: int) -> None:
        self.replicas[i].kill()
        self.replicas[i] = self.start(i)
        self.http[i] = _client(self.replicas[i].url)

    def close(self) -> None:
        for c in self.http:
            c.close()
        for r in self.replicas:
            r.kill()
        self.redis.stop()


@pytest.fixture(scope="module")
def cluster(tiny_paths, tmp_path_factory):
    c = Cluster(tiny_paths, tmp_path_factory.mktemp("cluster"))
    yield c
    c.close()


def turn(http: httpx.Client, session_id: str, text: str, **body: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={
        "model": "tiny", "session_id": session_id, "temperature": 0, "max_tokens": 3,
        "messages": [{"role": "user", "content": text}], **body})


def session(http: httpx.Client, session_id: str) -> dict[str, Any]:
    r = http.get(f"/v1/sessions/{session_id}")
    assert r.status_code == 200, r.text
    return r.json()


def test_turns_alternating_between_replicas_equal_one_server(cluster):
    a, b = cluster.http
    texts = [f"Fact {i}: the {w} is {c}." for i, (w, c) in enumerate(
        [("sky", "blue"), ("sea", "green"), ("sun", "gold"), ("moon", "grey"), ("rose", "red"), ("snow", "white")])]
    alternating = [turn((a, b)[i % 2], "alt", t).json() for i, t in enumerate(texts)]
    alone = [turn(a, "alone", t).json() for t in texts]
    assert [r["choices"][0]["message"]["content"] for r in alternating] == \
        [r["choices"][0]["message"]["content"] for r in alone]
    assert [r["delta_mem"]["version"] for r in alternating] == list(range(1, 7))
    alt, ref = session(b, "alt"), session(a, "alone")
    assert alt["written_token_ids"] == ref["written_token_ids"] and alt["written_digest"] == ref["written_digest"]
    assert torch.equal(export_state(a, "alt"), export_state(b, "alone"))


def test_racing_turns_commit_once_each_and_equal_a_serial_replay(cluster):
    """Many concurrent turns on the same sessions, sent to both replicas: each session's version is its
    number of successful turns, every 409 left nothing, and the state equals a serial replay."""
    sessions, per_session = [f"race-{s}" for s in range(4)], 6
    jobs = [(sid, j) for j in range(per_session) for sid in sessions]

    def send(job: tuple[str, int]) -> tuple[str, int, httpx.Response]:
        sid, j = job
        return sid, j, turn(cluster.http[j % 2], sid, f"{sid} says {j}.")

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, jobs))
    conflicts = 0
    for sid in sessions:
        won = sorted((r.json()["delta_mem"]["version"], j, r.json()) for s, j, r in results
                     if s == sid and r.status_code == 200)
        lost = [r for s, _, r in results if s == sid and r.status_code != 200]
        for r in lost:
            assert r.status_code == 409 and r.json()["error"]["code"] in ("session_conflict", "session_busy"), r.text
        conflicts += len(lost)
        assert [v for v, _, _ in won] == list(range(1, len(won) + 1)) and won
        assert session(cluster.http[0], sid)["version"] == len(won)
        replay = f"replay-{sid}"
        for _, j, original in won:
            again = turn(cluster.http[0], replay, f"{sid} says {j}.").json()
            assert again["choices"][0]["message"]["content"] == original["choices"][0]["message"]["content"]
        assert session(cluster.http[1], replay)["written_digest"] == session(cluster.http[0], sid)["written_digest"]
        # concurrent turns decode in one batch: equal up to batched-vs-single float rounding
        torch.testing.assert_close(export_state(cluster.http[1], replay), export_state(cluster.http[0], sid),
                                   atol=1e-6, rtol=0)
    print(f"\nraces: {len(jobs)} turns on {len(sessions)} sessions, {conflicts} refused with 409")


def test_session_operations_hold_across_replicas(cluster):
    """What one replica does to a session — delete, reset, fork, import, ownership — the other sees,
    even when it still holds the session resident."""
    a, b = cluster.http
    for http in (a, b):                       # resident on both
        assert turn(http, "ops", "I am Ada.").status_code == 200
    assert session(a, "ops")["version"] == 2
    assert b.post("/v1/sessions/ops/reset").status_code == 200
    assert session(a, "ops")["tokens_written"] == 0 and session(a, "ops")["version"] == 3
    after_reset = turn(a, "ops", "I am Bob.").json()
    assert after_reset["delta_mem"]["version"] == 4 and after_reset["delta_mem"]["pending_tokens"] == 0
    assert b.post("/v1/sessions/ops/fork", json={"id": "ops-fork"}).status_code == 200
    assert torch.equal(export_state(a, "ops-fork"), export_state(b, "ops"))
    doc = b.get("/v1/sessions/ops/state").json()
    assert a.put("/v1/sessions/ops-copy/state", json=doc).status_code == 200
    assert torch.equal(export_state(b, "ops-copy"), export_state(a, "ops"))
    other = _client(cluster.replicas[1].url, "key-2")      # another API key: another owner
    assert other.get("/v1/sessions/ops").status_code == 404
    assert b.delete("/v1/sessions/ops").status_code == 200
    assert a.get("/v1/sessions/ops").status_code == 404
    assert turn(a, "ops", "Who am I?").json()["delta_mem"]["version"] == 1   # a new session under the id
    # a stored response is found from either replica, and its chain continues on the other
    first = a.post("/v1/responses", json={"model": "tiny", "input": "I am Cy.", "max_output_tokens": 2}).json()
    later = b.post("/v1/responses", json={"model": "tiny", "input": "Who?", "max_output_tokens": 2,
                                          "previous_response_id": first["id"]}).json()
    assert later["delta_mem"]["session_id"] == first["id"] and later["delta_mem"]["version"] == 2
    assert a.get(f"/v1/responses/{later['id']}").json()["output"] == later["output"]


def test_kill9_of_a_replica_loses_no_acknowledged_turn(cluster):
    a, b = cluster.http
    assert turn(a, "k-long", "Remember the number 7.").status_code == 200
    acknowledged = {"k-long": 1, "k-other": 0}
    body = {"model": "tiny", "session_id": "k-long", "temperature": 0, "max_tokens": 3000, "ignore_eos": True,
            "stream": True, "messages": [{"role": "user", "content": "Count for me."}]}
    with a.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        for i in range(3):   # the other replica keeps serving meanwhile
            assert turn(b, "k-other", f"turn {i}").status_code == 200
            acknowledged["k-other"] += 1
        cluster.replicas[0].proc.kill()
        cluster.replicas[0].proc.wait(timeout=10)
    for sid, n in acknowledged.items():
        assert session(b, sid)["version"] == n
    assert turn(b, "k-long", "What number?").json()["delta_mem"]["version"] == 2   # B carries A's session on
    cluster.restart(0)
    assert session(cluster.http[0], "k-long")["version"] == 2


def test_redis_restart_mid_soak_gives_503s_and_loses_nothing(cluster):
    """Turns keep coming while Redis stops and starts again: 503s while it is down, every
    acknowledged turn is there afterwards, and the replicas recover without a restart."""
    stop = threading.Event()
    acked: dict[str, int] = {}
    failed: dict[str, int] = {}
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def client_loop(w: int) -> None:
        sid, i = f"outage-{w}", 0
        while not stop.is_set():
            try:
                r = turn(cluster.http[i % 2], sid, f"{sid} turn {i}")
                code = r.status_code
            except httpx.HTTPError:
                code = -1
            with lock:
                statuses[code] = statuses.get(code, 0) + 1
                if code == 200:
                    acked[sid] = acked.get(sid, 0) + 1
                else:
                    failed[sid] = failed.get(sid, 0) + 1
            i += 1
            time.sleep(0.01)

    threads = [threading.Thread(target=client_loop, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    cluster.redis.stop()
    time.sleep(1.5)
    for http in cluster.http:   # not ready while the store is down
        assert http.get("/ready").status_code == 503
    time.sleep(1.5)
    cluster.redis.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert statuses.get(503, 0) > 0 and set(statuses) <= {200, 503}, statuses
    assert all(http.get("/ready").status_code == 200 for http in cluster.http)
    for sid, n in acked.items():
        # a turn whose commit reached Redis just as it went away may have been answered 503
        assert n <= session(cluster.http[0], sid)["version"] <= n + failed.get(sid, 0)
        assert turn(cluster.http[1], sid, "after the outage").status_code == 200
    print(f"\nredis outage: {statuses}")


def _metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[-1])
    return 0.0


def test_soak_many_sessions_across_replicas(cluster):
    """200 sessions × 5 turns over both replicas with 2 device slots each (a restore on most turns);
    throughput, latency percentiles and restores printed."""
    n_sessions, n_turns = 200, 5
    restores0 = sum(_metric(h, "deltamem_state_restores") for h in cluster.http)
    latencies: list[float] = []

    def conversation(s: int) -> list[int]:
        codes = []
        for t in range(n_turns):
            t0 = time.perf_counter()
            r = turn(cluster.http[(s + t) % 2], f"soak-{s}", f"soak {s} turn {t}", max_tokens=2)
            latencies.append(time.perf_counter() - t0)
            codes.append(r.status_code)
        return codes

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = [c for cs in pool.map(conversation, range(n_sessions)) for c in cs]
    wall = time.perf_counter() - t0
    restores = sum(_metric(h, "deltamem_state_restores") for h in cluster.http) - restores0
    assert codes == [200] * (n_sessions * n_turns)
    for s in range(0, n_sessions, 37):
        assert session(cluster.http[s % 2], f"soak-{s}")["version"] == n_turns
    q = statistics.quantiles(latencies, n=100)
    print(f"\nsoak: {len(codes)} turns in {wall:.1f} s ({len(codes) / wall:.1f} turns/s), p50 {q[49] * 1000:.0f} ms, "
          f"p99 {q[98] * 1000:.0f} ms, {restores:.0f} restores")
    assert restores >= n_sessions      # two slots per replica: sessions come back from Redis


def test_a_session_deleted_and_created_again_elsewhere_is_never_the_old_one(cluster):
    """Versions repeat when an id is deleted and created again; a replica that still holds the old
    session resident must neither serve it nor commit over the new one, and the old session's
    stored responses go with it."""
    a, b = cluster.http
    assert turn(a, "again", "My name is Ada.").status_code == 200          # resident on A at version 1
    old = session(a, "again")
    assert b.delete("/v1/sessions/again").status_code == 200
    assert turn(b, "again", "My name is Bob.").json()["delta_mem"]["version"] == 1
    new = session(b, "again")
    assert new["written_digest"] != old["written_digest"] and new["version"] == old["version"]
    assert session(a, "again")["written_digest"] == new["written_digest"]
    assert torch.equal(export_state(a, "again"), export_state(b, "again"))
    assert turn(a, "again", "Who am I?").json()["delta_mem"]["version"] == 2   # continues Bob's memory
    assert session(b, "again")["tokens_written"] > new["tokens_written"]
    assert new["revision"] != old["revision"]
    assert turn(a, "gone", "I am Eve.").status_code == 200                # resident on A
    assert b.delete("/v1/sessions/gone").status_code == 200
    assert a.post("/v1/sessions/gone/reset").status_code == 404          # not brought back by a reset
    assert a.get("/v1/sessions/gone").status_code == 404

    body = {"model": "tiny", "input": "I am Cy.", "max_output_tokens": 2, "session_id": "again-r"}
    first = a.post("/v1/responses", json=body)
    assert first.status_code == 200, first.text
    rid = first.json()["id"]
    assert b.get(f"/v1/responses/{rid}").status_code == 200
    assert b.delete("/v1/sessions/again-r").status_code == 200
    assert turn(b, "again-r", "I am Dan.").status_code == 200              # the id lives again
    for http in (a, b):
        assert http.get(f"/v1/responses/{rid}").status_code == 404
    r = a.post("/v1/responses", json={"model": "tiny", "input": "Who?", "previous_response_id": rid})
    assert r.status_code == 404 and r.json()["error"]["param"] == "previous_response_id"


@pytest.fixture
def ttl_cluster(tiny_paths, tmp_path):
    """Two replicas that sweep expired sessions four times a second."""
    c = Cluster(tiny_paths, tmp_path, ("--ttl-sweep-interval", "0.25"), durable=False)
    yield c
    c.close()


def _long_turn(http: httpx.Client, session_id: str, tokens: int) -> tuple[float, list[str]]:
    """A streamed turn of `tokens` tokens; (seconds, the SSE data lines)."""
    body = {"model": "tiny", "session_id": session_id, "temperature": 0, "max_tokens": tokens,
            "ignore_eos": True, "stream": True, "messages": [{"role": "user", "content": "Count."}]}
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    return time.perf_counter() - t0, lines


def test_ttl_expiry_never_races_a_turn_on_another_replica(ttl_cluster):
    """A turn starts on B in the second half of its session's TTL and runs past it, while A sweeps
    expired sessions: the turn commits (starting it counted as use), and once the session is idle
    for a whole TTL both replicas answer 404."""
    a, b = ttl_cluster.http
    seconds, _ = _long_turn(b, "calibrate", 1500)
    ttl = seconds / 0.7                        # the turn below lasts 0.7 TTL and starts at 0.6 TTL
    assert a.post("/v1/sessions", json={"id": "ttl-s", "ttl": ttl}).status_code == 200
    assert turn(a, "ttl-s", "Remember 7.").status_code == 200
    committed = time.monotonic()
    time.sleep(0.6 * ttl)
    took, lines = _long_turn(b, "ttl-s", 1500)
    assert time.monotonic() - committed > ttl + 0.5, "the turn did not outlive the TTL: the test proves nothing"
    assert lines[-1] == "data: [DONE]" and '"error"' not in lines[-2], lines[-2][:300]
    assert session(a, "ttl-s")["version"] == 2
    import redis
    store = redis.Redis.from_url(ttl_cluster.redis.url)

    def states() -> int:
        return sum(is_storage_key(k.decode()[len("mr:"):]) for k in store.keys("mr:*"))

    assert states() == 2                                  # ttl-s and calibrate
    time.sleep(ttl + 1)
    for http in (a, b):
        assert http.get("/v1/sessions/ttl-s").status_code == 404
    assert states() == 1                                  # swept: deleted, not only hidden
    print(f"\nttl {ttl:.1f} s; a turn of {took:.1f} s started at {0.6 * ttl:.1f} s committed")


@pytest.fixture
def quota_cluster(tiny_paths, tmp_path):
    """Two replicas on one Redis with a limit of four sessions per API key."""
    c = Cluster(tiny_paths, tmp_path, ("--max-sessions-per-owner", "4"), durable=False)
    yield c
    c.close()


def test_per_owner_limits_hold_across_replicas_and_responses_go_with_their_session(quota_cluster):
    """Twelve sessions created at once over both replicas under a limit of four: exactly four exist,
    the others are 429 and left nothing; another key has its own four. A stored response lives in
    Redis only as long as its session: deleting the session on the other replica removes it."""
    import redis
    a, b = quota_cluster.http

    def create(i: int) -> httpx.Response:
        return quota_cluster.http[i % 2].post("/v1/sessions", json={"id": f"q-{i}"})

    with ThreadPoolExecutor(max_workers=12) as pool:
        codes = [r.status_code for r in pool.map(create, range(12))]
    assert sorted(codes) == [200] * 4 + [429] * 8, codes
    refused = create(codes.index(429))
    assert refused.json()["error"]["code"] == "session_quota_exceeded", refused.text
    listed = a.get("/v1/sessions").json()["data"]
    assert len(listed) == 4
    other = _client(quota_cluster.replicas[1].url, "key-2")
    assert all(other.post("/v1/sessions", json={"id": f"o-{i}"}).status_code == 200 for i in range(4))
    assert turn(a, "q-new", "hello").status_code == 429               # an implicit creation counts too
    assert b.delete(f"/v1/sessions/{listed[0]['id']}").status_code == 200
    first = a.post("/v1/responses", json={"model": "tiny", "input": "I am Ada.", "max_output_tokens": 2})
    assert first.status_code == 200, first.text
    chain = first.json()["id"]
    assert session(b, chain)["ttl"] == 30 * 86400                       # a chain's own session expires
    store = redis.Redis.from_url(quota_cluster.redis.url)
    assert store.exists(*[k for k in store.keys("mr:response:*")]) == 1
    assert b.delete(f"/v1/sessions/{chain}").status_code == 200
    assert store.keys("mr:response:*") == [] and store.keys("mr:docs:*") == []
    assert a.post("/v1/sessions", json={"id": "q-again"}).status_code == 200
    other.close()
