"""One generation request from prepared tokens to engine outputs, with the session commit.

Shared by /v1/chat/completions and /v1/completions. The commit happens before the final output is
handed to the route, so a client that receives a finish_reason knows the turn is stored; any exit
before that (error, disconnect, cancellation, shutdown) commits nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Protocol

from server.engine.base import (EngineError, GenerationOutput, GenerationRequest, MemorySpec, SamplingParams,
                                TokenLogprob)
from server.errors import APIError, bad_request
from server.prompt import ChatMessage, TurnTokens
from server.schemas import _GenerationBody
from server.sessions import SessionTurn
from server.steps import Steps
from server.tool_stream import CallReader, StreamStep
from server.tools import ToolCall, ToolUse


SEED_MASK = 2**64 - 1   # branch seeds wrap around within the range every engine accepts


def resolve_session_id(body_id: str | None, header_id: str | None) -> str | None:
    """Body wins; both given and different → 400."""
    header_id = header_id.strip() if header_id is not None else None
    if body_id is not None and header_id and body_id != header_id:
        raise bad_request(f"session_id in the body ({body_id!r}) differs from the X-Session-ID header ({header_id!r})",
                          param="session_id", code="session_id_conflict")
    return body_id if body_id is not None else (header_id or None)


def sampling_from(body: _GenerationBody, max_tokens: int | None, vocab_size: int) -> SamplingParams:
    bias: dict[int, float] = {}
    for key, val in (body.logit_bias or {}).items():
        tid = int(key)
        if tid >= vocab_size:
            raise bad_request(f"logit_bias token id {tid} is outside the vocabulary (size {vocab_size})",
                              param="logit_bias", code="invalid_value")
        bias[tid] = float(val)
    stop_ids = tuple(body.stop_token_ids or ())
    if any(not 0 <= t < vocab_size for t in stop_ids):
        raise bad_request("stop_token_ids must be token ids of the vocabulary", param="stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens or 1,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        min_tokens=min(body.min_tokens, max_tokens or 1),
        logprobs=body.num_logprobs(),
        structured=body.structured_output(),
        seed=body.seed,
        stop=body.stop_list(),
        stop_token_ids=stop_ids,
        ignore_eos=body.ignore_eos,
        logit_bias=bias,
    )


def decide_max_tokens(requested: int | None, default: int | None, prompt_len: int, max_model_len: int,
                      prompt_param: str = "messages") -> int:
    """The completion budget; 400 (context_length_exceeded) when the prompt leaves no room for it."""
    room = max_model_len - prompt_len
    if room < 1 or (requested is not None and requested > room):
        want = f" plus {requested} completion tokens" if requested is not None else ""
        raise APIError(400, f"this model's maximum context length is {max_model_len} tokens; the request has "
                            f"{prompt_len} prompt tokens{want}. Shorten the {prompt_param} or max_tokens.",
                       param=prompt_param, code="context_length_exceeded")
    if requested is not None:
        return requested
    return min(room, default) if default else room


class Keeper(Protocol):
    """Keeps a record of a finished turn (a stored response): saved before the session commits,
    discarded if the commit is known to have failed, so a session never names a record that does
    not exist."""

    async def save(self, turn: "Turn") -> None: ...

    async def discard(self) -> None: ...


@dataclass
class Turn:
    """A prepared request: tokens, sampling and Δ-Mem instruction, plus the session turn if any."""

    kind: str                         # "chat" | "completion" | "response"
    tokens: TurnTokens
    sampling: SamplingParams
    write: bool
    session: SessionTurn | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    final: GenerationOutput | None = None
    committed: bool = False
    index: int = 0                    # the choice index among n branches
    tool_use: ToolUse | None = None   # tools were offered: how the reply is read back
    response_id: str | None = None    # the Responses API response this turn produces
    keeper: Keeper | None = None      # stores that response
    _reply: tuple[str | None, list[ToolCall]] | None = field(default=None, repr=False)
    _reader: CallReader | None = field(default=None, repr=False)      # tools read as the reply streams
    _steps: list[StreamStep] = field(default_factory=list, repr=False)
    # branches of one request share its session; the last one to finish releases it
    _holders: list[int] = field(default_factory=lambda: [1], repr=False)
    _released: bool = field(default=False, repr=False)

    @property
    def memory(self) -> MemorySpec:
        s = self.session
        return MemorySpec(initial_state=s.state if s else None, write_start=self.tokens.write_start,
                          write=self.write, cache_salt=s.cache_salt if s else None,
                          message_ids=self.tokens.message_ids, sentence_ids=self.tokens.sentence_ids,
                          return_state=s is not None)

    @property
    def text(self) -> str:
        """The reply so far (what the client has been sent)."""
        return "".join(self.pieces)

    def stream_tools(self) -> None:
        """Read tool calls while the reply streams (the reply is then what was streamed)."""
        if self.tool_use is not None:
            self._reader = self.tool_use.reader()

    def observe(self, out: GenerationOutput) -> None:
        """Take one engine output into the reply."""
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs or ())
        self.pieces.append(out.text)
        if self._reader is not None:
            self._steps.append(self._reader.feed(out.text, out.token_ids, out.finished))
            if out.finished:
                self._reply = self._reader.reply()

    def take_steps(self) -> StreamStep:
        """Content and tool-call deltas read since the last call (streamed tools only)."""
        steps, self._steps = self._steps, []
        return StreamStep("".join(s.content for s in steps), [d for s in steps for d in s.calls])

    def reply(self) -> tuple[str | None, list[ToolCall]]:
        """The finished reply as (content, tool calls), read once (tool call ids are made here)."""
        if self._reply is None:
            self._reply = self.tool_use.read(self.text) if self.tool_use is not None else (self.text, [])
        return self._reply

    def reply_message(self) -> ChatMessage:
        content, calls = self.reply()
        return ChatMessage("assistant", content or "", tuple(calls))

    @property
    def finish_reason(self) -> str | None:
        if self.final is None:
            return None
        if self.final.finish_reason == "length":    # a call cut short is still cut short
            return "length"
        return "tool_calls" if self.reply()[1] else self.final.finish_reason

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._holders[0] -= 1
        if self.session is not None and self._holders[0] == 0:
            self.session.release()

    def branches(self, n: int) -> list["Turn"]:
        """This turn and n−1 siblings that sample independently (seed+i when seeded). Only a turn that
        writes nothing can branch: n continuations cannot all be committed to one session."""
        assert n == 1 or self.session is None or not self.write
        self._holders[0] = n
        seed = self.sampling.seed
        return [self] + [replace(self, request_id=uuid.uuid4().hex, index=i, pieces=[], token_ids=[], logprobs=[],
                                 _steps=[],
                                 sampling=replace(self.sampling, seed=None if seed is None else (seed + i) & SEED_MASK))
                         for i in range(1, n)]

    def delta_mem_info(self) -> dict[str, Any]:
        """Non-standard response field: what this turn did to the memory."""
        t = self.tokens
        info: dict[str, Any] = {
            "session_id": self.session.session_id if self.session else None,
            "context_tokens": t.num_context,
            "pending_tokens": t.num_pending,
            "write": self.write,
            "committed": self.committed,
        }
        if self.final is not None and self.final.written_token_ids is not None:
            info["written_tokens"] = len(self.final.written_token_ids)
        if self.session is not None:
            info["version"] = self.session.record.version
        return info


async def _until_draining(outputs: AsyncIterator[GenerationOutput],
                          draining: asyncio.Event) -> AsyncIterator[GenerationOutput]:
    """The engine's outputs, until the server drains for shutdown: then a 503 instead of a cut stream."""
    stop = asyncio.ensure_future(draining.wait())
    steps = Steps(outputs)
    try:
        while True:
            await asyncio.wait({steps.pending(), stop}, return_when=asyncio.FIRST_COMPLETED)
            if not steps.pending().done():
                raise APIError(503, "the server is shutting down: this turn was stopped before it finished and "
                                    "nothing was committed; send it again", code="shutting_down")
            try:
                item = steps.take()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stop.cancel()
        # the engine's generator may be suspended inside its step (drain, or our own cancellation on a
        # disconnect): cancelled there, its cleanup aborts the request in the engine
        await steps.cancel()


async def run_turn(ctx: Any, turn: Turn) -> AsyncIterator[GenerationOutput]:
    """Engine outputs for the turn; the final one is yielded only after the commit succeeded."""
    engine, metrics = ctx.engine, ctx.metrics
    req = GenerationRequest(turn.request_id, turn.tokens.token_ids, turn.sampling, turn.memory)
    t0 = time.perf_counter()
    outcome = "aborted"
    metrics.active.inc()
    try:
        async with contextlib.aclosing(engine.generate(req)) as outputs:
            async for out in _until_draining(outputs, ctx.draining):
                if out.token_ids and not turn.token_ids:
                    metrics.ttft.labels(turn.kind).observe(time.perf_counter() - t0)
                turn.observe(out)
                if out.finished:
                    if out.finish_reason not in ("stop", "length"):
                        outcome = "error"
                        raise EngineError(out.error or f"generation ended with {out.finish_reason}")
                    turn.final = out
                    metrics.prompt_tokens.inc(out.prompt_tokens)
                    metrics.generation_tokens.inc(out.completion_tokens)
                    if turn.session is not None and turn.write:
                        reply = turn.reply_message() if turn.kind != "completion" else None
                        if turn.keeper is not None:
                            await turn.keeper.save(turn)
                        try:
                            await turn.session.commit(out, reply, turn.response_id)
                        except Exception as exc:
                            # a commit that may have landed names the stored response: keep it
                            unknown = isinstance(exc, APIError) and exc.code == "commit_unknown"
                            if turn.keeper is None:
                                raise
                            if not unknown:
                                await turn.keeper.discard()
                                raise
                            raise APIError(503, f"{exc}. The response is kept as {turn.response_id}: if the "
                                                "session's last_response_id names it, the turn was committed.",
                                           code="commit_unknown", headers={"X-Response-ID": turn.response_id}) from exc
                        turn.committed = True
                        metrics.written_tokens.inc(len(out.written_token_ids or ()))
                        outcome = "committed"
                    else:
                        if turn.keeper is not None:
                            await turn.keeper.save(turn)
                        outcome = "stateless" if turn.session is None else "read_only"
                yield out
    except asyncio.CancelledError:
        outcome = "aborted"
        raise
    except APIError:
        outcome = "error"
        raise
    finally:
        metrics.active.dec()
        metrics.turns.labels(turn.kind, outcome).inc()
        turn.release()
