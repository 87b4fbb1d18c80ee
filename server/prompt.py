"""Chat prompt rendering and the memory-mode split of a session request into context-only and new parts.

Pure logic (a tokenizer in, token ids and offsets out) so it is unit-tested without HTTP or a model.

The split: system messages are context-only once the session has written them. Among the other
messages, the longest leading run equal (role + content hash) to the trailing run of the session's
written message log is context-only; the rest — always including the last message — is new. The
prompt is the chat template over the messages as sent; tokens before the first new message are
read-only, tokens from it on (incl. the generation prompt) are written.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Sequence

from delta_mem_vllm.segments import chat_segment_ids, common_prefix_len
from server.tools import ToolCall

SYSTEM_ROLES = ("system", "developer")


@dataclass(frozen=True)
class ChatMessage:
    """A message normalised to what the chat template and the message log see."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()     # an assistant message that called tools
    tool_call_id: str | None = None           # a tool message: the call it answers

    @property
    def is_system(self) -> bool:
        return self.role in SYSTEM_ROLES

    def log_entry(self) -> str:
        """Compact, order-sensitive identity of the message in a session's written log."""
        blob = f"{self.role}\0{self.content}"
        if self.tool_calls or self.tool_call_id:
            blob += "\0" + "\0".join(c.identity() for c in self.tool_calls) + f"\0{self.tool_call_id}"
        digest = hashlib.sha256(blob.encode()).hexdigest()[:32]
        return f"{self.role}:{digest}"

    def template_dict(self) -> dict[str, Any]:
        # "developer" is OpenAI's new name for the system role; chat templates know "system"
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class TurnTokens:
    """The token sequence of one turn and which of its tokens are written.

    token_ids = context_ids + pending_ids + new_ids; write_start = len(context_ids), so the pending
    tokens of the previous turn are the first tokens this turn writes.
    """

    token_ids: list[int]
    write_start: int
    num_context: int
    num_pending: int
    # segment-write adapters only: per-token message / sentence ids, −1 = no segment
    message_ids: tuple[int, ...] | None = None
    sentence_ids: tuple[int, ...] | None = None

    @property
    def num_written_prompt(self) -> int:
        return len(self.token_ids) - self.write_start


def split_messages(messages: Sequence[ChatMessage], message_log: Sequence[str],
                   written_system: Sequence[str] | set[str]) -> int:
    """Index of the first new message of a session request; it is never past the last one."""
    if not messages:
        raise ValueError("messages must not be empty")
    written_sys = set(written_system)
    others = [i for i, m in enumerate(messages) if not m.is_system]
    entries = [messages[i].log_entry() for i in others]
    # the last message is always new, so at most len(others)-1 leading non-system messages match
    max_j = len(others) - 1 if others and others[-1] == len(messages) - 1 else len(others)
    max_j = min(max_j, len(message_log))
    j = 0
    for cand in range(max_j, 0, -1):
        if list(message_log[len(message_log) - cand:]) == entries[:cand]:
            j = cand
            break
    first_new = others[j] if j < len(others) else len(messages)
    # a system message the session has never written is new (and so is everything after it)
    for i, m in enumerate(messages[:first_new]):
        if m.is_system and m.log_entry() not in written_sys:
            first_new = i
            break
    return min(first_new, len(messages) - 1)


def render(tokenizer: Any, messages: Sequence[ChatMessage], add_generation_prompt: bool,
           tools: Sequence[dict[str, Any]] = ()) -> list[int]:
    """Chat template → token ids (no BOS games: the template decides); `tools` as OpenAI sends them."""
    if not messages:
        return []
    extra = {"tools": list(tools)} if tools else {}
    ids = tokenizer.apply_chat_template([m.template_dict() for m in messages], tokenize=True,
                                        add_generation_prompt=add_generation_prompt, return_dict=False, **extra)
    return list(ids)


def tools_prefix_len(tokenizer: Any, tools: Sequence[dict[str, Any]]) -> int:
    """Tokens the template renders for a tool list ahead of the first message: what two different
    one-message conversations share with the tools, less what they share without (the start every
    message has), so that the block ends on a message boundary."""
    def shared(with_tools: Sequence[dict[str, Any]]) -> int:
        a = render(tokenizer, [ChatMessage("user", "\x00")], add_generation_prompt=False, tools=with_tools)
        b = render(tokenizer, [ChatMessage("assistant", "\x01")], add_generation_prompt=False, tools=with_tools)
        return common_prefix_len(a, b)

    return max(0, shared(tools) - shared(()))


def build_chat_turn(tokenizer: Any, messages: Sequence[ChatMessage], first_new: int,
                    pending: Sequence[int] = (), granularity: str = "token",
                    tools: Sequence[dict[str, Any]] = (), tools_written: bool = False) -> TurnTokens:
    """Token ids of a chat turn: context-only prefix, then pending tokens, then the new part.

    The context length is the rendering of messages[:first_new]; if a template does not render
    that as a prefix of the full prompt, the common prefix is used (more tokens written, never fewer).
    Segment-write adapters also get segment ids: the pending tokens form the first segment, then
    each new message (or sentence) one, as the reference assigns them; the generation prompt none.
    """
    full = render(tokenizer, messages, add_generation_prompt=True, tools=tools)
    n_ctx = 0
    if first_new > 0:
        ctx = render(tokenizer, messages[:first_new], add_generation_prompt=False, tools=tools)
        n_ctx = len(ctx) if full[:len(ctx)] == ctx else common_prefix_len(full, ctx)
    elif tools and tools_written:   # only new messages, behind a tool list written before: that is context
        n_ctx = min(tools_prefix_len(tokenizer, tools), common_prefix_len(full, render(
            tokenizer, [messages[0]], add_generation_prompt=False, tools=tools)))
    pend = list(pending)
    turn = TurnTokens(token_ids=full[:n_ctx] + pend + full[n_ctx:], write_start=n_ctx,
                      num_context=n_ctx, num_pending=len(pend))
    if granularity == "token":
        return turn
    seg = chat_segment_ids(tokenizer, [m.template_dict() for m in messages], add_generation_prompt=True,
                           sentences=granularity == "sentence_mean")
    if seg.input_ids != full:
        raise ValueError("segment ids do not align with the rendered prompt")

    def ids(per_token: list[int]) -> tuple[int, ...]:
        return tuple([-1] * n_ctx + [0] * len(pend) + [i + 1 if i >= 0 else -1 for i in per_token[n_ctx:]])

    return replace(turn, message_ids=ids(seg.message_ids), sentence_ids=ids(seg.sentence_ids))


def build_text_turn(prompt_ids: Sequence[int], pending: Sequence[int] = (), granularity: str = "token") -> TurnTokens:
    """A raw-text (completions) turn: every prompt token is new (one segment after the pending one)."""
    pend = list(pending)
    turn = TurnTokens(token_ids=pend + list(prompt_ids), write_start=0, num_context=0, num_pending=len(pend))
    if granularity == "token":
        return turn
    ids = tuple([0] * len(pend) + [1] * len(prompt_ids))
    return replace(turn, message_ids=ids, sentence_ids=ids)
