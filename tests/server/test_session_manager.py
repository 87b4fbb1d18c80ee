"""SessionManager without HTTP or a model: records, commit/rollback, locking, TTL, fork/reset/import."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from delta_mem_vllm.state import MemoryBackend, Snapshot, TieredStateStore, export_document, storage_key
from server.engine.base import GenerationOutput
from server.errors import APIError
from server.prompt import ChatMessage
from server.session_record import EMPTY_DIGEST, extend_digest
from server.sessions import EngineIdentity, SessionManager

SHAPE = (2, 1, 4, 4)
NAMES = ["model.layers.0.self_attn", "model.layers.1.self_attn"]


class FakeTokenizer:
    """Each message renders to [len(role), *content bytes, 0]; generation prompt = [99]."""

    def apply_chat_template(self, msgs, tokenize, add_generation_prompt, return_dict):
        ids = []
        for m in msgs:
            ids += [len(m["role"]), *m["content"].encode(), 0]
        return ids + ([99] if add_generation_prompt else [])


class FlakyBackend(MemoryBackend):
    fail = False

    def put(self, key, snapshot, *args, **kwargs):
        if self.fail:
            raise OSError("disk full")
        super().put(key, snapshot, *args, **kwargs)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(backend=None, **kw) -> SessionManager:
    ident = EngineIdentity(SHAPE, NAMES, "fp-a", "", lambda: torch.zeros(SHAPE))
    store = TieredStateStore(backend or MemoryBackend(), device_capacity=2, host_capacity=2,
                             expect_adapter_fingerprint="fp-a", expect_shape=SHAPE, expect_layer_names=NAMES)
    kw.setdefault("wait_timeout", 5.0)
    return SessionManager(store, ident, **kw)


def output(state: torch.Tensor, written: list[int], pending: list[int], reason="stop") -> GenerationOutput:
    return GenerationOutput("r", [], "", finished=True, finish_reason=reason, final_state=state,
                            written_token_ids=written, pending_token_ids=pending)


def run(coro):
    return asyncio.run(coro)


def test_create_get_list_delete_and_owner_isolation():
    async def go():
        m = make()
        rec = await m.create("alice", "s1", ttl=60, metadata={"k": "v"})
        assert rec.version == 0 and rec.metadata == {"k": "v"}
        with pytest.raises(APIError) as e:
            await m.create("alice", "s1")
        assert e.value.status == 409
        got, state, tier = await m.get("alice", "s1")
        assert got.session_id == "s1" and torch.equal(state, torch.zeros(SHAPE)) and tier == "device"
        with pytest.raises(APIError) as e:
            await m.get("bob", "s1")  # another owner's session does not exist for bob
        assert e.value.status == 404
        await m.create("bob", "s1")
        auto = await m.create("alice")
        assert auto.session_id.startswith("sess_")
        page, more = await m.list("alice")
        assert {r.session_id for r in page} == {"s1", auto.session_id} and not more
        page, more = await m.list("alice", limit=1)
        assert len(page) == 1 and more
        await m.delete("alice", "s1")
        with pytest.raises(APIError) as e:
            await m.delete("alice", "s1")
        assert e.value.status == 404
        assert (await m.get("bob", "s1"))[0].owner == "bob"
        with pytest.raises(APIError) as e:
            await m.get("alice", "bad id")
        assert e.value.status == 400
    run(go())


def test_turn_commit_and_rollback():
    async def go():
        m = make()
        tok = FakeTokenizer()
        turn = await m.begin_turn("", "s")            # auto-created
        msgs = [ChatMessage("system", "S"), ChatMessage("user", "hi")]
        t = turn.plan_chat(tok, msgs)
        assert t.write_start == 0 and t.num_pending == 0
        new_state = torch.ones(SHAPE)
        await turn.commit(output(new_state, [1, 2, 3], [42]), ChatMessage("assistant", "yo"))
        turn.release()
        rec, state, _ = await m.get("", "s")
        assert rec.version == 1
        assert torch.equal(state, new_state)
        assert rec.pending_token_ids == [42] and rec.tokens_written == 3
        assert rec.written_digest == extend_digest(EMPTY_DIGEST, [1, 2, 3])
        assert rec.message_log == [ChatMessage("user", "hi").log_entry(), ChatMessage("assistant", "yo").log_entry()]
        # next turn in memory mode: system is context-only, pending tokens come first after it
        turn = await m.begin_turn("", "s")
        t = turn.plan_chat(tok, [ChatMessage("system", "S"), ChatMessage("user", "more")])
        ctx_len = len(tok.apply_chat_template([{"role": "system", "content": "S"}], True, False, False))
        assert t.write_start == ctx_len and t.token_ids[ctx_len] == 42
        turn.release()                                  # no commit: nothing changes
        rec2, state2, _ = await m.get("", "s")
        assert rec2.to_dict() == rec.to_dict() and torch.equal(state2, new_state)
        # an aborted generation can never be committed
        turn = await m.begin_turn("", "s")
        turn.plan_chat(tok, [ChatMessage("user", "x")])
        with pytest.raises(ValueError):
            await turn.commit(output(torch.ones(SHAPE), [1], [2], reason="abort"))
        turn.release()
        # read-only turn: commit is a no-op
        turn = await m.begin_turn("", "s", write=False)
        turn.plan_chat(tok, [ChatMessage("user", "x")])
        assert await turn.commit(output(torch.full(SHAPE, 5.0), [1], [2])) is None
        turn.release()
        assert (await m.get("", "s"))[0].version == 1
    run(go())


def test_reset_turn_forgets_log_pending_and_state():
    async def go():
        m = make()
        turn = await m.begin_turn("", "s")
        turn.plan_chat(FakeTokenizer(), [ChatMessage("user", "a")])
        await turn.commit(output(torch.ones(SHAPE), [1, 2], [3]), ChatMessage("assistant", "b"))
        turn.release()
        turn = await m.begin_turn("", "s", reset=True)
        assert torch.equal(turn.state, torch.zeros(SHAPE))
        t = turn.plan_chat(FakeTokenizer(), [ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c")])
        assert t.write_start == 0 and t.num_pending == 0   # everything is new again
        await turn.commit(output(torch.full(SHAPE, 2.0), [7], [8]), ChatMessage("assistant", "d"))
        turn.release()
        rec, _, _ = await m.get("", "s")
        assert rec.tokens_written == 1 and rec.written_digest == extend_digest(EMPTY_DIGEST, [7])
        assert len(rec.message_log) == 4 and rec.version == 2
    run(go())


def test_auto_create_off_gives_404():
    async def go():
        m = make(auto_create=False)
        with pytest.raises(APIError) as e:
            await m.begin_turn("", "nope")
        assert e.value.status == 404 and e.value.code == "session_not_found"
    run(go())


def test_same_session_is_serialised_fifo_and_bounded():
    async def go():
        m = make(wait_timeout=2.0)
        order: list[int] = []

        async def worker(i: int, hold: float) -> None:
            turn = await m.begin_turn("", "s")
            order.append(i)
            await asyncio.sleep(hold)
            turn.release()

        first = asyncio.create_task(worker(0, 0.2))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(worker(i, 0.01)) for i in (1, 2, 3)]
        await asyncio.gather(first, *rest)
        assert order == [0, 1, 2, 3]

        m.wait_timeout = 0.05
        holder = await m.begin_turn("", "s")
        with pytest.raises(APIError) as e:
            await m.begin_turn("", "s")
        assert e.value.status == 409 and e.value.code == "session_busy"
        other = await m.begin_turn("", "other")   # other sessions are not blocked
        other.release()
        holder.release()
        (await m.begin_turn("", "s")).release()   # and the lock is usable again
    run(go())


def test_failed_persist_commits_nothing():
    async def go():
        backend = FlakyBackend()
        m = make(backend)
        turn = await m.begin_turn("", "s")
        turn.plan_chat(FakeTokenizer(), [ChatMessage("user", "a")])
        backend.fail = True
        with pytest.raises(APIError) as e:
            await turn.commit(output(torch.ones(SHAPE), [1], [2]), ChatMessage("assistant", "b"))
        assert e.value.status == 503
        turn.release()
        backend.fail = False
        rec, state, _ = await m.get("", "s")
        assert rec.version == 0 and torch.equal(state, torch.zeros(SHAPE))
    run(go())


def test_fork_reset_export_import():
    async def go():
        m = make()
        turn = await m.begin_turn("", "s")
        turn.plan_chat(FakeTokenizer(), [ChatMessage("user", "a")])
        st = torch.randn(SHAPE)
        await turn.commit(output(st, [1, 2], [3]), ChatMessage("assistant", "b"))
        turn.release()
        fork = await m.fork("", "s", "f")
        assert fork.version == 0 and fork.pending_token_ids == [3] and fork.message_log
        assert torch.equal((await m.get("", "f"))[1], st)
        doc = await m.export("", "s")
        await m.import_("", "imported", doc)
        rec, state, _ = await m.get("", "imported")
        assert torch.equal(state, st) and rec.pending_token_ids == [3] and rec.version == 1
        reset = await m.reset("", "s")
        assert reset.version == 2 and reset.tokens_written == 0 and reset.pending_token_ids == []
        assert torch.equal((await m.get("", "s"))[1], torch.zeros(SHAPE))
        # a document for another adapter is a conflict; a damaged one is a bad request
        other = export_document(Snapshot(st, {}, "fp-b", NAMES))
        with pytest.raises(APIError) as e:
            await m.import_("", "x", other)
        assert e.value.status == 409 and e.value.code == "adapter_mismatch"
        bad = dict(doc, data=doc["data"][:-8] + "AAAAAAA=")
        with pytest.raises(APIError) as e:
            await m.import_("", "x", bad)
        assert e.value.status == 400
        with pytest.raises(APIError) as e:
            await m.fork("", "s", "f")  # target exists
        assert e.value.status == 409
    run(go())


def test_ttl_expiry_on_access_and_sweep():
    async def go():
        clock = Clock()
        m = make(clock=clock, default_ttl=10)
        await m.create("", "a")
        await m.create("", "b", ttl=100)
        clock.t += 11
        with pytest.raises(APIError) as e:
            await m.get("", "a")
        assert e.value.status == 404
        assert m.store.contains(storage_key("", "a"))   # a read answers 404 and deletes nothing
        clock.t += 100
        assert await m.sweep_expired() == 2
        assert (await m.list(""))[0] == [] and not m.store.keys()
    run(go())


def test_a_read_of_an_expired_session_never_takes_it_from_a_turn_in_flight():
    """A turn outlives the session's TTL; a GET (or export, or fork) meanwhile answers 404 but must
    not delete the session under it, so the turn commits and the memory is kept."""
    async def go():
        clock = Clock()
        m = make(clock=clock, default_ttl=10)
        turn = await m.begin_turn("", "s")
        await turn.commit(output(torch.ones(SHAPE), [5, 6], [7]))
        turn.release()
        clock.t += 4
        turn = await m.begin_turn("", "s")
        turn.plan_text([8])
        clock.t += 7
        for read in (m.get("", "s"), m.export("", "s"), m.fork("", "s", "f")):
            with pytest.raises(APIError) as e:
                await read
            assert e.value.status == 404
        rec = await turn.commit(output(2 * torch.ones(SHAPE), [7, 8], [9]))
        turn.release()
        assert rec.version == 2 and rec.tokens_written == 4
        got, state, _ = await m.get("", "s")
        assert got.version == 2 and torch.equal(state, 2 * torch.ones(SHAPE))
    run(go())


def test_starting_a_turn_counts_as_use_and_expiry_deletes_only_what_it_saw():
    """A turn started in the second half of the TTL records the use at once (same version, a new
    revision), so a sweep that runs while the turn does leaves the session alone; a turn on a
    session already expired starts a new one, and the old memory is deleted under the lock."""
    async def go():
        clock = Clock()
        m = make(clock=clock, default_ttl=10)
        turn = await m.begin_turn("", "s")
        await turn.commit(output(torch.ones(SHAPE), [5], [6]))
        turn.release()
        first = (await m.get("", "s"))[0]
        clock.t += 6                                 # past half the TTL
        turn = await m.begin_turn("", "s", write=False)
        touched = (await m.get("", "s"))[0]
        assert touched.version == first.version and touched.revision != first.revision
        assert touched.last_used_at == clock.t
        clock.t += 6                                 # 12 s after the last commit, 6 s after the start
        assert await m.sweep_expired() == 0
        turn.release()
        assert (await m.get("", "s"))[0].tokens_written == 1
        clock.t += 11
        turn = await m.begin_turn("", "s")
        assert turn.record.version == 0 and turn.record.tokens_written == 0   # expired: a new session
        assert turn.record.incarnation != first.incarnation
        turn.release()
    run(go())


def test_records_stay_bounded_and_imports_are_checked_off_the_event_loop(monkeypatch):
    """A system prompt that changes every turn (a timestamp in it) and an imported record with huge logs
    keep the record bounded; the import's record check (a hash chain over every written token) runs in a
    worker thread, never on the event loop that serves every other request."""
    import server.sessions as sessions
    from server.session_record import WRITTEN_SYSTEM_MAX

    async def go():
        m = make(message_log_max=8)
        for i in range(WRITTEN_SYSTEM_MAX + 10):
            turn = await m.begin_turn("", "s")
            turn.plan_chat(FakeTokenizer(), [ChatMessage("system", f"time {i}"), ChatMessage("user", f"u{i}")])
            await turn.commit(output(torch.zeros(SHAPE), [1], [2]), ChatMessage("assistant", "ok"))
            turn.release()
        rec = (await m.get("", "s"))[0]
        assert len(rec.message_log) == 8 and len(rec.written_system) == WRITTEN_SYSTEM_MAX
        last = ChatMessage("system", f"time {WRITTEN_SYSTEM_MAX + 9}").log_entry()
        assert rec.written_system[-1] == last and ChatMessage("system", "time 0").log_entry() not in rec.written_system

        doc = await m.export("", "s")
        snap = sessions.import_document(doc)
        big = {**snap.record, "message_log": [ChatMessage("user", str(i)).log_entry() for i in range(5000)],
               "written_system": [ChatMessage("system", str(i)).log_entry() for i in range(500)]}
        checked_in: list[int] = []
        real = sessions.memory_record_problem

        def spy(*args, **kwargs):
            checked_in.append(threading.get_ident())
            return real(*args, **kwargs)

        monkeypatch.setattr(sessions, "memory_record_problem", spy)
        await m.import_("", "big", export_document(Snapshot(snap.state, big, snap.adapter_fingerprint,
                                                            snap.layer_names)))
        assert checked_in and checked_in[0] != threading.get_ident()   # not the loop's thread
        rec = (await m.get("", "big"))[0]
        assert rec.message_log == big["message_log"][-8:]
        assert rec.written_system == big["written_system"][-WRITTEN_SYSTEM_MAX:]
    run(go())


class CountingBackend(MemoryBackend):
    """Counts full scans (`keys`) and can fail reads for a while."""

    def __init__(self) -> None:
        super().__init__()
        self.scans = 0
        self.fail_reads = False
        self.gate: threading.Event | None = None

    def keys(self):
        self.scans += 1
        return super().keys()

    def get(self, key):
        if self.fail_reads:
            raise ConnectionError("store unreachable")
        return super().get(key)

    def group_keys(self, group):
        if self.fail_reads:
            raise ConnectionError("store unreachable")
        return super().group_keys(group)

    def put(self, key, snapshot, *args, **kwargs):
        if self.gate is not None:
            self.gate.wait(10)
        super().put(key, snapshot, *args, **kwargs)


def test_listing_and_the_sweep_read_indexes_not_every_tenant():
    async def go():
        clock = Clock()
        backend = CountingBackend()
        m = make(backend, clock=clock)
        for owner, n in (("alice", 3), ("bob", 50)):
            for i in range(n):
                await m.create(owner, f"s{i}", ttl=10 if i % 2 else None)
        page, more = await m.list("alice")
        assert [r.session_id for r in page] == ["s0", "s1", "s2"] and not more
        clock.t += 11
        assert await m.sweep_expired() == 1 + 25           # the odd ones, found through the expiry index
        assert [r.session_id for r in (await m.list("alice"))[0]] == ["s0", "s2"]
        assert backend.scans == 0
    run(go())


def test_a_store_outage_is_a_503_and_a_reset_writes_nothing_without_its_revision():
    async def go():
        backend = CountingBackend()
        m = make(backend)
        turn = await m.begin_turn("", "s")
        await turn.commit(output(torch.ones(SHAPE), [5], [6]))
        turn.release()
        m.store._device.clear()
        m.store._host.clear()                              # not resident: reads go to the backend
        backend.fail_reads = True
        for call in (m.list(""), m.reset("", "s"), m.get("", "s")):
            with pytest.raises(APIError) as e:
                await call
            assert e.value.status == 503
        backend.fail_reads = False
        rec, state, _ = await m.get("", "s")
        assert rec.version == 1 and torch.equal(state, torch.ones(SHAPE))   # the reset wrote nothing
    run(go())


def test_a_cancelled_request_keeps_the_session_until_its_commit_lands():
    """The commit of a turn is shielded: when its request is cancelled the commit goes on, and the
    next request on the session waits for it (and then starts from it) instead of racing it."""
    async def go():
        backend = CountingBackend()
        m = make(backend, wait_timeout=0)
        turn = await m.begin_turn("", "s")
        backend.gate = threading.Event()
        committing = asyncio.ensure_future(turn.commit(output(torch.ones(SHAPE), [5], [6])))
        await asyncio.sleep(0.05)
        committing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await committing
        turn.release()
        with pytest.raises(APIError) as e:                 # still busy: the commit is in flight
            await m.begin_turn("", "s")
        assert e.value.code == "session_busy"
        backend.gate.set()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not m._locks.busy(storage_key("", "s")):
                break
        nxt = await m.begin_turn("", "s")
        assert nxt.record.version == 1 and torch.equal(nxt.state, torch.ones(SHAPE))
        nxt.release()
    run(go())
