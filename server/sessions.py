"""SessionManager: session records, per-session serialisation, TTL, and commit/rollback of a turn.

No HTTP here: routes call these methods and render the results. The store (TieredStateStore) is
the single source of truth; its blocking I/O runs in threads. A turn works on private copies and
changes nothing until `commit`, which writes state + record in one store.put (atomic, durable).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from delta_mem_vllm.state import (
    ABSENT,
    CommitUnknown,
    PersistError,
    Quota,
    QuotaExceeded,
    Snapshot,
    StateFormatError,
    StateMismatchError,
    VersionConflict,
    export_document,
    import_document,
    quota_group,
    record_revision,
    storage_key,
    validate_session_id,
)
from server.engine.base import GenerationOutput
from server.errors import APIError, bad_request, conflict, not_found
from server.prompt import ChatMessage, TurnTokens, build_chat_turn, build_text_turn, split_messages
from server.session_record import SessionRecord, memory_record_problem
from server.tools import tools_identity

log = logging.getLogger("deltamem.sessions")


# far beyond any state a turn produces (the gates keep states small), well inside fp32 and bf16 range
MAX_STATE_ABS = 1e6


@dataclass(frozen=True)
class EngineIdentity:
    """What the manager needs to know about the engine's states."""

    state_shape: tuple[int, ...]
    layer_names: list[str]
    adapter_fingerprint: str
    model_fingerprint: str
    zero_state: Callable[[], torch.Tensor]
    vocab_size: int | None = None          # imported token ids must be below it


def check_session_id(session_id: Any, param: str = "session_id") -> str:
    try:
        return validate_session_id(session_id)
    except ValueError as exc:
        raise bad_request(str(exc), param=param, code="invalid_session_id") from None


def state_error(exc: Exception, session_id: str) -> APIError:
    """A stored state that cannot be used: tell the client what to do about it."""
    if isinstance(exc, StateMismatchError):
        return conflict(f"session {session_id!r} has a state saved for a different adapter or layout: {exc}. "
                        "Reset or delete the session to continue.", code="adapter_mismatch")
    if isinstance(exc, StateFormatError):
        return conflict(f"the stored state of session {session_id!r} is corrupted and was rejected: {exc}. "
                        "Reset or delete the session to continue.", code="state_corrupted")
    return APIError(503, f"session store unavailable: {exc}", code="store_unavailable")


def quota_error(exc: QuotaExceeded) -> APIError:
    """429 for too many sessions, 507 for too many bytes: what the owner can do about it."""
    if exc.kind == "states":
        return APIError(429, f"{exc}: this API key holds {exc.limit} sessions, the most it may. Delete sessions "
                             "(DELETE /v1/sessions/{id}) or let them expire, then retry.", code="session_quota_exceeded")
    return APIError(507, f"{exc}: this API key's sessions and stored responses take all the storage it may use. "
                         "Delete sessions or stored responses, then retry; nothing was committed.",
                    code="storage_quota_exceeded")


class _Lease:
    """A held per-session lock; release() is idempotent so every exit path may call it."""

    def __init__(self, owner: "_KeyLocks", key: str, lock: asyncio.Lock) -> None:
        self._owner, self._key, self._lock, self._held = owner, key, lock, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()
            self._owner._drop(self._key)


class _KeyLocks:
    """FIFO per-key locks with a bounded wait (asyncio.Lock wakes waiters in arrival order)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, key: str, timeout: float, session_id: str) -> _Lease:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            if not lock.locked():
                await lock.acquire()  # free: taken at once, no suspension
            elif timeout <= 0:
                raise asyncio.TimeoutError
            else:
                await asyncio.wait_for(lock.acquire(), timeout=timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            self._drop(key)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise conflict(f"session {session_id!r} is busy with another request; retry later",
                           code="session_busy") from None
        return _Lease(self, key, lock)

    def _drop(self, key: str) -> None:
        lock, users = self._locks[key]
        if users <= 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)

    def busy(self, key: str) -> bool:
        return key in self._locks


class SessionTurn:
    """One request's turn on a session: the lock, private copies, and the commit."""

    def __init__(self, manager: "SessionManager", key: str, record: SessionRecord, state: torch.Tensor,
                 lease: _Lease, *, write: bool) -> None:
        self._mgr = manager
        self.key = key
        self.record = record
        self.state = state
        self._lease = lease
        self.write = write
        self._new_entries: list[str] = []
        self._new_system: list[str] = []
        self.tokens: TurnTokens | None = None
        self._base = record.revision            # the commit goes over exactly this stored revision
        self._committing: asyncio.Future[None] | None = None

    @property
    def session_id(self) -> str:
        return self.record.session_id

    @property
    def cache_salt(self) -> str:
        """Cached KV of a memory-mode context depends on the state: never shared across commits
        (nor across a deleted session and its namesake, whose versions repeat)."""
        return f"{self.key}:{self._base}"

    def plan_chat(self, tokenizer: Any, messages: Sequence[ChatMessage], granularity: str = "token",
                  tools: Sequence[dict[str, Any]] = ()) -> TurnTokens:
        """Split the messages and build context + pending + new token ids. A tool list is
        rendered by the template ahead of the messages: it is written with them the first time the
        whole prompt is new, and read as context afterwards, never written twice."""
        log_, sys_, pending = self.record.message_log, self.record.written_system, self.record.pending_token_ids
        first_new = split_messages(messages, log_, sys_)
        new = messages[first_new:]
        self._new_entries = [m.log_entry() for m in new if not m.is_system]
        self._new_system = [m.log_entry() for m in new if m.is_system]
        written = bool(tools) and tools_identity(tools) in sys_
        if tools and first_new == 0 and not written:
            self._new_system.append(tools_identity(tools))
        self.tokens = build_chat_turn(tokenizer, messages, first_new, pending, granularity, tools, written)
        return self.tokens

    def plan_text(self, prompt_ids: Sequence[int], granularity: str = "token") -> TurnTokens:
        self.tokens = build_text_turn(prompt_ids, self.record.pending_token_ids, granularity)
        return self.tokens

    async def commit(self, output: GenerationOutput, reply: ChatMessage | None = None,
                     response_id: str | None = None) -> SessionRecord | None:
        """Store the turn's state and record atomically (only after a normal finish). Shielded: once
        started it completes even if the request is cancelled, so memory and store never disagree.
        `response_id` names the Responses API response this turn produced (None for other routes)."""
        if not self.write:
            return None
        if output.finish_reason not in ("stop", "length") or output.final_state is None:
            raise ValueError(f"refusing to commit a turn that finished with {output.finish_reason!r}")
        rec = SessionRecord.from_dict(self.record.to_dict())
        rec.remember(self._new_entries + ([reply.log_entry()] if reply else []), self._new_system,
                     self._mgr.message_log_max)
        rec.pending_token_ids = list(output.pending_token_ids or [])
        rec.record_written(list(output.written_token_ids or []), self._mgr.keep_written_tokens)
        rec.next_commit(self._mgr.clock())
        rec.turns += 1
        rec.last_response_id = response_id
        state = output.final_state.detach().to(torch.float32).reshape(self._mgr.identity.state_shape)
        self._committing = asyncio.ensure_future(self._mgr._put(self.key, rec, state, expect=self._base))
        await asyncio.shield(self._committing)
        self.record = rec
        return rec

    def release(self) -> None:
        """Let the next request on the session in: now, or, when a cancelled request's shielded
        commit is still running, once it has landed (the next turn must start from it)."""
        pending = self._committing
        if pending is not None and not pending.done():
            pending.add_done_callback(self._release_after)
        else:
            self._lease.release()

    def _release_after(self, commit: asyncio.Future[None]) -> None:
        if not commit.cancelled():
            commit.exception()   # its request is gone: the outcome was logged by _put's callers or not at all
        self._lease.release()


class SessionManager:
    def __init__(self, store: Any, identity: EngineIdentity, *, auto_create: bool = True,
                 default_ttl: float | None = None, wait_timeout: float = 30.0, message_log_max: int = 4096,
                 keep_written_tokens: bool = False, max_sessions_per_owner: int | None = None,
                 max_stored_bytes_per_owner: int | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.identity = identity
        self.auto_create = auto_create
        self.default_ttl = default_ttl
        self.wait_timeout = wait_timeout
        self.message_log_max = message_log_max
        self.keep_written_tokens = keep_written_tokens
        self.max_sessions_per_owner = max_sessions_per_owner
        self.max_stored_bytes_per_owner = max_stored_bytes_per_owner
        self.clock = clock
        self._locks = _KeyLocks()

    # --- store access (blocking I/O off the event loop) -------------------------------------------
    def _snapshot(self, rec: SessionRecord, state: torch.Tensor) -> Snapshot:
        return Snapshot(state=state, record=rec.to_dict(), adapter_fingerprint=self.identity.adapter_fingerprint,
                        layer_names=list(self.identity.layer_names), model_fingerprint=self.identity.model_fingerprint)

    def quota(self, owner: str) -> Quota:
        """What an owner's sessions and stored responses count against."""
        return Quota(quota_group(owner), self.max_sessions_per_owner, self.max_stored_bytes_per_owner)

    async def _put(self, key: str, rec: SessionRecord, state: torch.Tensor, expect: str | None = None) -> None:
        """Store a snapshot; with `expect`, only over that stored revision (ABSENT: a new session), else
        409: another replica sharing the store committed to this session first."""
        try:
            await asyncio.to_thread(self.store.put, key, self._snapshot(rec, state), expect, self.quota(rec.owner),
                                    None if rec.ttl is None else rec.last_used_at + rec.ttl)
        except QuotaExceeded as exc:
            raise quota_error(exc) from exc
        except CommitUnknown as exc:
            raise APIError(503, f"the store failed while committing to session {rec.session_id!r} and its outcome "
                                f"could not be read back: the turn may or may not be committed ({exc}). Read the "
                                f"session: revision {rec.revision} means it was.", code="commit_unknown") from exc
        except VersionConflict as exc:
            raise conflict(f"session {rec.session_id!r} was changed by another request (another replica "
                           f"committed first: {exc}); nothing was committed, send the request again",
                           code="session_conflict") from exc
        except StateFormatError as exc:
            raise APIError(500, f"refusing to store an invalid state: {exc}", type="server_error",
                           code="invalid_state") from exc
        except PersistError as exc:
            raise APIError(503, f"could not persist the session state (nothing was committed): {exc}",
                           code="persist_failed") from exc

    async def _load(self, key: str, session_id: str) -> Snapshot | None:
        """The live committed snapshot, or None (absent, or expired: reads delete nothing)."""
        snap = await self._load_any(key, session_id)
        return None if snap is None or self._expired(snap) else snap

    async def _load_any(self, key: str, session_id: str) -> Snapshot | None:
        try:
            return await asyncio.to_thread(self.store.get, key)
        except Exception as exc:  # noqa: BLE001 - corrupted (409) or unreachable store (503)
            raise state_error(exc, session_id) from exc

    def _expired(self, snap: Snapshot) -> bool:
        return SessionRecord.from_dict(snap.record).expired(self.clock())

    async def _load_locked(self, key: str, session_id: str) -> Snapshot | None:
        """Under the session's lock: the live snapshot, or None. An expired session is deleted here,
        only at the revision seen expired, so expiry never takes a commit or a use from under a turn."""
        while True:
            snap = await self._load_any(key, session_id)
            if snap is None or not self._expired(snap):
                return snap
            try:
                await asyncio.to_thread(self.store.delete, key, record_revision(snap.record))
                return None
            except VersionConflict:
                continue   # used or deleted meanwhile on another replica: look again
            except PersistError as exc:
                raise APIError(503, f"could not delete the expired session: {exc}", code="persist_failed") from exc

    async def _touch(self, key: str, rec: SessionRecord, state: torch.Tensor) -> None:
        """Starting a turn counts as use: a session past half its TTL has its use committed first, so
        no replica's sweep deletes it while the turn runs (the turn must not outlast half the TTL)."""
        now = self.clock()
        if rec.ttl is None or now - rec.last_used_at <= rec.ttl / 2:
            return
        expect = rec.revision
        rec.next_commit(now, bump=False)
        await self._put(key, rec, state, expect=expect)

    def _new_record(self, owner: str, session_id: str, ttl: float | None = None,
                    metadata: dict[str, str] | None = None) -> SessionRecord:
        now = self.clock()
        return SessionRecord.new(session_id=session_id, owner=owner, created_at=now, last_used_at=now,
                                 ttl=ttl if ttl is not None else self.default_ttl, metadata=dict(metadata or {}),
                                 written_token_ids=[] if self.keep_written_tokens else None)

    async def _salvage_record(self, key: str, owner: str, session_id: str) -> SessionRecord:
        """The identity (created, ttl, metadata, version) of a session whose state is unusable, when its
        manifest is still readable; else a new record."""
        try:
            data = await asyncio.to_thread(self.store.peek_record, key)
            if data:
                return SessionRecord.from_dict(data)
        except Exception:  # noqa: BLE001 - nothing to salvage
            pass
        return self._new_record(owner, session_id)

    async def _lock(self, key: str, session_id: str) -> _Lease:
        return await self._locks.acquire(key, self.wait_timeout, session_id)

    # --- turns -------------------------------------------------------------------------------------
    async def begin_turn(self, owner: str, session_id: str, *, reset: bool = False, write: bool = True) -> SessionTurn:
        """Wait for the session (FIFO, bounded → 409), load or create it; the caller must release()."""
        key = storage_key(owner, session_id)
        lease = await self._lock(key, session_id)
        try:
            snap = await self._load_locked(key, session_id)
            if snap is None:
                if not self.auto_create:
                    raise not_found(f"session {session_id!r} not found", param="session_id", code="session_not_found")
                rec = self._new_record(owner, session_id)
                state = self.identity.zero_state()
                try:
                    await self._put(key, rec, state, expect=ABSENT)
                except APIError as exc:
                    if exc.code != "session_conflict":
                        raise
                    snap = await self._load(key, session_id)   # created by another replica meanwhile
                    if snap is None:
                        raise
            if snap is not None:
                rec, state = SessionRecord.from_dict(snap.record), snap.state
                await self._touch(key, rec, state)
            if reset:
                rec.clear_memory()
                state = self.identity.zero_state()
            return SessionTurn(self, key, rec, state, lease, write=write)
        except BaseException:
            lease.release()
            raise

    # --- session API -------------------------------------------------------------------------------
    async def create(self, owner: str, session_id: str | None = None, *, ttl: float | None = None,
                     metadata: dict[str, str] | None = None) -> SessionRecord:
        session_id = check_session_id(session_id, "id") if session_id is not None else f"sess_{uuid.uuid4().hex}"
        key = storage_key(owner, session_id)
        lease = await self._lock(key, session_id)
        try:
            exists = conflict(f"session {session_id!r} already exists", code="session_exists", param="id")
            if await self._load_locked(key, session_id) is not None:
                raise exists
            rec = self._new_record(owner, session_id, ttl, metadata)
            try:
                await self._put(key, rec, self.identity.zero_state(), expect=ABSENT)
            except APIError as exc:
                raise (exists if exc.code == "session_conflict" else exc) from None
            return rec
        finally:
            lease.release()

    async def get(self, owner: str, session_id: str) -> tuple[SessionRecord, torch.Tensor, str | None]:
        """(record, state, residency tier) of an existing session, else 404."""
        session_id = check_session_id(session_id)
        key = storage_key(owner, session_id)
        snap = await self._load(key, session_id)
        if snap is None:
            raise not_found(f"session {session_id!r} not found", code="session_not_found")
        tier = await asyncio.to_thread(self.store.tier_of, key)
        return SessionRecord.from_dict(snap.record), snap.state, tier

    def _records(self, keys: Iterable[str]) -> Iterator[tuple[str, SessionRecord]]:
        """The readable session records of these keys, without loading states (blocking I/O)."""
        for key in keys:
            try:
                data = self.store.peek_record(key)
            except (StateFormatError, OSError):
                continue
            if data:
                yield key, SessionRecord.from_dict(data)

    async def list(self, owner: str, *, limit: int = 100, after: str | None = None) -> tuple[list[SessionRecord], bool]:
        """The owner's live sessions in id order; (page, has_more). The cursor is a position, not a
        session: paging goes on from it even when that session was deleted meanwhile."""
        def scan() -> list[SessionRecord]:
            now = self.clock()
            keys = self.store.group_keys(quota_group(owner))   # the owner's own index: no other tenant read
            return [rec for _, rec in self._records(keys) if rec.owner == owner and not rec.expired(now)
                    and (after is None or rec.session_id > after)]

        try:
            recs = sorted(await asyncio.to_thread(scan), key=lambda r: r.session_id)
        except PersistError as exc:
            raise APIError(503, f"session store unavailable: {exc}", code="store_unavailable") from exc
        return recs[:limit], len(recs) > limit

    async def state_problems(self, owner: str, records: Sequence[SessionRecord]) -> dict[str, APIError]:
        """The error GET would answer for each listed session whose state cannot be used, so that a
        listing and GET agree (states are read, but not made resident)."""
        def check() -> dict[str, APIError]:
            problems = {}
            for rec in records:
                try:
                    self.store.verify(storage_key(owner, rec.session_id))
                except Exception as exc:  # noqa: BLE001 - reported per session
                    problems[rec.session_id] = state_error(exc, rec.session_id)
            return problems

        return await asyncio.to_thread(check)

    async def delete(self, owner: str, session_id: str) -> None:
        session_id = check_session_id(session_id)
        key = storage_key(owner, session_id)
        lease = await self._lock(key, session_id)
        try:
            try:
                removed = await asyncio.to_thread(self.store.delete, key)
            except PersistError as exc:
                raise APIError(503, f"could not delete the session state: {exc}", code="persist_failed") from exc
            if not removed:
                raise not_found(f"session {session_id!r} not found", code="session_not_found")
        finally:
            lease.release()

    async def _mutate(self, owner: str, session_id: str,
                      change: Callable[[SessionRecord, torch.Tensor], tuple[SessionRecord, torch.Tensor]],
                      *, create: bool = False) -> SessionRecord:
        """Load → change → store under the session's lock (reset, import). An unreadable state is
        replaced; an absent session is created only with `create`."""
        key = storage_key(owner, session_id)
        lease = await self._lock(key, session_id)
        try:
            unreadable = False
            try:
                snap = await self._load_locked(key, session_id)
            except APIError as exc:
                if exc.status == 503:
                    raise
                snap, unreadable = None, True  # an unreadable state may be replaced by an import or a reset
            if snap is None:
                if not (create or unreadable):
                    raise not_found(f"session {session_id!r} not found", code="session_not_found")
                rec, state = await self._salvage_record(key, owner, session_id), self.identity.zero_state()
            else:
                rec, state = SessionRecord.from_dict(snap.record), snap.state
            expect = None if unreadable else ABSENT if snap is None else rec.revision
            rec, state = change(rec, state)
            rec.next_commit(self.clock())
            await self._put(key, rec, state, expect=expect)
            return rec
        finally:
            lease.release()

    async def reset(self, owner: str, session_id: str) -> SessionRecord:
        session_id = check_session_id(session_id)

        def change(rec: SessionRecord, _: torch.Tensor) -> tuple[SessionRecord, torch.Tensor]:
            rec.clear_memory()
            return rec, self.identity.zero_state()

        # a reset also recovers a session whose stored state is corrupted
        return await self._mutate(owner, session_id, change)

    async def incarnation(self, owner: str, session_id: str) -> str | None:
        """The live session's incarnation ("" for records older than incarnations), None when it
        does not exist or has expired; the state's tensors are not read."""
        key = storage_key(owner, check_session_id(session_id))
        try:
            data = await asyncio.to_thread(self.store.peek_record, key)
        except PersistError as exc:
            raise APIError(503, f"session store unavailable: {exc}", code="store_unavailable") from exc
        except StateFormatError:
            data = None
        if not data:
            return None
        rec = SessionRecord.from_dict(data)
        return None if rec.expired(self.clock()) else rec.incarnation

    async def fork(self, owner: str, session_id: str, new_id: str | None = None, *,
                   ttl: float | None = None, metadata: dict[str, str] | None = None) -> SessionRecord:
        """A new session with the same state, message log and pending tokens (version starts over)."""
        src, state, _ = await self.get(owner, session_id)
        new_id = check_session_id(new_id, "id") if new_id is not None else f"sess_{uuid.uuid4().hex}"
        key = storage_key(owner, new_id)
        lease = await self._lock(key, new_id)
        try:
            exists = conflict(f"session {new_id!r} already exists", code="session_exists", param="id")
            if await self._load_locked(key, new_id) is not None:
                raise exists
            now = self.clock()
            rec = SessionRecord.new(**src.to_dict())
            rec.session_id, rec.created_at, rec.last_used_at, rec.version = new_id, now, now, 0
            rec.ttl = ttl if ttl is not None else src.ttl
            rec.metadata = dict(metadata) if metadata is not None else dict(src.metadata)
            try:
                await self._put(key, rec, state, expect=ABSENT)
            except APIError as exc:
                raise (exists if exc.code == "session_conflict" else exc) from None
            return rec
        finally:
            lease.release()

    async def export(self, owner: str, session_id: str) -> dict[str, Any]:
        rec, state, _ = await self.get(owner, session_id)
        snap = self._snapshot(rec, state)
        return await asyncio.to_thread(export_document, snap)

    async def import_(self, owner: str, session_id: str, document: Any) -> SessionRecord:
        """Replace (or create) a session's state from an exported document; 409 on adapter mismatch."""
        session_id = check_session_id(session_id)
        ident = self.identity
        try:
            snap = await asyncio.to_thread(import_document, document,
                                           expect_adapter_fingerprint=ident.adapter_fingerprint,
                                           expect_shape=tuple(ident.state_shape),
                                           expect_layer_names=list(ident.layer_names))
        except StateMismatchError as exc:
            raise conflict(f"state does not fit the loaded adapter: {exc}", code="adapter_mismatch") from exc
        except StateFormatError as exc:
            raise bad_request(f"invalid state document: {exc}", code="invalid_state") from exc
        peak = float(snap.state.abs().max()) if snap.state.numel() else 0.0
        if peak > MAX_STATE_ABS:
            raise bad_request(f"invalid state document: state values reach {peak:.3g}, beyond any state a turn "
                              f"produces (|x| <= {MAX_STATE_ABS:g})", code="invalid_state")
        src = None
        if snap.record.get("session_id"):   # a whole record: its memory bookkeeping comes along
            # off the event loop: the written-token hash chain of a large record takes seconds
            src = await asyncio.to_thread(self._imported_record, snap.record)

        def change(rec: SessionRecord, _: torch.Tensor) -> tuple[SessionRecord, torch.Tensor]:
            rec.clear_memory()
            if src is not None:  # carry the memory's bookkeeping so the next turn continues it exactly
                rec.turns = src.turns
                rec.tokens_written, rec.written_digest = src.tokens_written, src.written_digest
                rec.remember(src.message_log, src.written_system, self.message_log_max)   # cleared above
                rec.pending_token_ids = [int(t) for t in src.pending_token_ids]
                if rec.written_token_ids is not None and src.written_token_ids is not None:
                    rec.written_token_ids = list(src.written_token_ids)
            return rec, snap.state.to(torch.float32)

        return await self._mutate(owner, session_id, change, create=True)

    def _imported_record(self, data: dict[str, Any]) -> SessionRecord:
        """An imported document's record, checked whole (400 naming the problem)."""
        problem = memory_record_problem(data, self.identity.vocab_size)
        if problem:
            raise bad_request(f"invalid state document: record: {problem}", code="invalid_state")
        try:
            return SessionRecord.from_dict(data)
        except TypeError as exc:
            raise bad_request(f"invalid state document: record: {exc}", code="invalid_state") from exc

    async def sweep_expired(self) -> int:
        """Delete expired sessions that are not in use; returns how many."""
        def expired_keys() -> list[str]:
            now = self.clock()   # the expiry index names the candidates; each record decides
            return [key for key, rec in self._records(self.store.expiring(now)) if rec.expired(now)]

        removed = 0
        for key in await asyncio.to_thread(expired_keys):
            if self._locks.busy(key):
                continue  # in use: not idle, whatever its record says
            lease = await self._locks.acquire(key, 0, key)
            try:
                data = await asyncio.to_thread(self.store.peek_record, key)
                if data and SessionRecord.from_dict(data).expired(self.clock()):
                    try:   # only the revision seen expired: a replica may have used it since
                        removed += bool(await asyncio.to_thread(self.store.delete, key, record_revision(data)))
                    except VersionConflict:
                        pass
            finally:
                lease.release()
        return removed
