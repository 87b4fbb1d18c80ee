"""Tool calls read out of a reply while it streams (pure logic, no framework).

A client gets each call's id and name as soon as the name is whole and its arguments as they are
generated, as OpenAI streams them. The reply that ends the turn — what a session logs — is exactly
what was streamed, so a client that sends the exchange back is recognised as sending written history.
A finished reply that was not streamed is read by feeding it whole, so both paths agree.

Readers: `HermesCallReader` (`<tool_call>{json}</tool_call>` blocks after optional content),
`NamedCallReader` (a named tool_choice: the reply is the arguments) and `ArrayCallReader`
(`required`: a JSON array of {name, parameters}); vLLM's streaming parsers sit behind the same
interface in server/engine/vllm_tools.py.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

START, END = "<tool_call>", "</tool_call>"
ARGUMENT_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str        # a JSON object, as text (OpenAI's shape)

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}

    def template(self) -> dict[str, Any]:
        """The form chat templates expect: arguments as a mapping where they parse as one."""
        try:
            args: Any = json.loads(self.arguments)
        except ValueError:
            args = self.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": args}}

    def identity(self) -> str:
        return f"{self.id}\0{self.name}\0{self.arguments}"


@dataclass
class CallDelta:
    """One piece of a streamed call: the first carries id and name, the others argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def openai(self) -> dict[str, Any]:
        if self.id is not None:
            return {"index": self.index, "id": self.id, "type": "function",
                    "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class StreamStep:
    """What one piece of reply text adds: content for the client, and call deltas."""

    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


class CallReader(Protocol):
    def feed(self, text: str, token_ids: Sequence[int] = (), final: bool = False) -> StreamStep: ...

    def reply(self) -> tuple[str | None, list[ToolCall]]: ...


class CallLog:
    """The calls streamed so far, kept as the client assembles them."""

    def __init__(self, max_calls: int | None) -> None:
        self.max_calls = max_calls
        self.calls: list[list[str]] = []     # [id, name, arguments]

    @property
    def full(self) -> bool:
        return self.max_calls is not None and len(self.calls) >= self.max_calls

    def open(self, name: str, call_id: str | None = None) -> CallDelta:
        self.calls.append([call_id or new_call_id(), name, ""])
        return CallDelta(len(self.calls) - 1, self.calls[-1][0], name)

    def extend(self, text: str) -> CallDelta:
        self.calls[-1][2] += text
        return CallDelta(len(self.calls) - 1, arguments=text)

    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(*c) for c in self.calls]


class CallScanner:
    """One streamed JSON object `{"name": "...", "<args key>": value}`, character by character: its
    name once whole, the raw text of its arguments value as it comes (a string value whole, decoded,
    as OpenAI's arguments are text). `done` once the object closes; `failed` if it is not an object."""

    def __init__(self, args_keys: Sequence[str] = ARGUMENT_KEYS) -> None:
        self.args_keys = tuple(args_keys)
        self.name: str | None = None
        self.done = self.failed = False
        self._depth = 0
        self._in_str = self._esc = False
        self._str: list[str] = []          # a key or the name, raw
        self._str_role = ""                 # "key" | "name" | "skip"
        self._key: str | None = None
        self._expect_value = False
        self._args = 0                      # 0 before, 1 inside, 2 after the arguments value
        self._args_depth = 0
        self._args_kind = ""                # "container" | "string" | "scalar"
        self._args_raw: list[str] = []

    def feed(self, text: str) -> tuple[int, str]:
        """(characters consumed, argument text to stream). Consumption stops where the object ends."""
        out: list[str] = []
        for i, c in enumerate(text):
            if self.done or self.failed:
                return i, "".join(out)
            if self._args == 1 and self._in_args(c, out):
                continue
            self._structure(c, out)
        return len(text), "".join(out)

    def _in_args(self, c: str, out: list[str]) -> bool:
        """Inside the arguments value: True when c belongs to it."""
        kind = self._args_kind
        if kind == "scalar" and not self._in_str and (c in ",}" or c.isspace()):
            self._args = 2
            return False
        self._args_raw.append(c)
        if kind != "string":
            out.append(c)
        if self._in_str:
            if self._string_step(c) and kind == "string":
                self._args = 2
                try:
                    value = json.loads("".join(self._args_raw))
                except ValueError:
                    value = "".join(self._args_raw)
                out.append(value)
        elif c == '"':
            self._in_str = True
        elif c in "{[":
            self._args_depth += 1
        elif c in "}]":
            self._args_depth -= 1
            if self._args_depth == 0:
                self._args = 2
        return True

    def _string_step(self, c: str) -> bool:
        """One character inside a JSON string; True when it closes the string."""
        if self._esc:
            self._esc = False
        elif c == "\\":
            self._esc = True
        elif c == '"':
            self._in_str = False
            return True
        return False

    def _structure(self, c: str, out: list[str]) -> None:
        if self._in_str:
            if self._string_step(c):
                self._close_string()
            else:
                self._str.append(c)
            return
        if c.isspace():
            return
        if self._depth == 0:
            if c == "{":
                self._depth = 1
            else:
                self.failed = True
            return
        if self._depth == 1 and self._expect_value:
            self._expect_value = False
            if self._key in self.args_keys and self._args == 0:
                self._args, self._args_kind = 1, "string" if c == '"' else "container" if c in "{[" else "scalar"
                self._args_depth = 0
                self._in_args(c, out)
                return
            if c == '"':
                self._begin_string("name" if self._key == "name" else "skip")
                return
        if c == '"':
            self._begin_string("key" if self._depth == 1 else "skip")
        elif c == ":" and self._depth == 1:
            self._expect_value = True
        elif c == "," and self._depth == 1:
            self._key = None
        elif c in "{[":
            self._depth += 1
        elif c in "}]":
            self._depth -= 1
            if self._depth == 0:
                self.done = True

    def _begin_string(self, role: str) -> None:
        self._in_str, self._str_role, self._str = True, role, []

    def _close_string(self) -> None:
        try:
            value = json.loads('"' + "".join(self._str) + '"')
        except ValueError:
            self.failed = True
            return
        if self._str_role == "key":
            self._key = value
        elif self._str_role == "name" and self.name is None:
            self.name = value


class _Holdback:
    """Content up to a marker, holding back what could still become the marker or trailing
    whitespace (which may precede a tool call, and then is not content)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.sent = 0

    def release(self, text: str) -> tuple[str, int | None]:
        """(content that is safe to send, where the marker starts if it does)."""
        at = text.find(self.marker, self.sent)
        if at >= 0:
            out = text[self.sent:at].rstrip()
            self.sent += len(out)
            return out, at
        safe = len(text)
        for k in range(min(len(self.marker) - 1, len(text) - self.sent), 0, -1):
            if self.marker.startswith(text[-k:]):
                safe -= k
                break
        safe = self.sent + len(text[self.sent:safe].rstrip())
        out, self.sent = text[self.sent:safe], max(self.sent, safe)
        return out, None


class _ObjectCall:
    """One call object as it streams: the call opens once its name is known, with any argument text
    that came before the name."""

    def __init__(self, log: CallLog, args_keys: Sequence[str] = ARGUMENT_KEYS) -> None:
        self.scanner, self.log = CallScanner(args_keys), log
        self.opened, self.held = False, ""

    @property
    def ended(self) -> bool:
        return self.scanner.done or self.scanner.failed

    def feed(self, text: str, step: StreamStep) -> int:
        used, args = self.scanner.feed(text)
        if not self.opened and self.scanner.name is not None:
            step.calls.append(self.log.open(self.scanner.name))
            self.opened, args, self.held = True, self.held + args, ""
        if args and self.opened:
            step.calls.append(self.log.extend(args))
        elif args:
            self.held += args
        return used


class HermesCallReader:
    """Content until the first `<tool_call>`, then one call per block (text between blocks is not
    content). A reply without a call is all content; a block that never names a function is dropped
    when another call was made, else given back as content."""

    def __init__(self, max_calls: int | None = None, start: str = START) -> None:
        self._text = ""
        self._content: list[str] = []
        self._gate = _Holdback(start)
        self._start = start
        self._log = CallLog(max_calls)
        self._call: _ObjectCall | None = None
        self._pos = 0                  # where reading goes on once calls began
        self._calling = False

    def feed(self, text: str, token_ids: Sequence[int] = (), final: bool = False) -> StreamStep:
        self._text += text
        step = StreamStep()
        if not self._calling:
            content, at = self._gate.release(self._text)
            step.content = content
            if at is not None:
                self._calling, self._pos = True, at
        while self._calling and (self._call or not self._log.full) and self._pos < len(self._text):
            if self._call is None:
                at = self._text.find(self._start, self._pos)
                if at < 0:
                    self._pos = max(self._pos, len(self._text) - len(self._start) + 1)
                    break
                self._pos, self._call = at + len(self._start), _ObjectCall(self._log)
            self._pos += self._call.feed(self._text[self._pos:], step)
            if self._call.ended:
                self._call = None
        if final and not self._log.calls:   # no call after all: everything is content
            step.content += self._text[self._gate.sent:]
            self._gate.sent = len(self._text)
        self._content.append(step.content)
        return step

    def reply(self) -> tuple[str | None, list[ToolCall]]:
        content = "".join(self._content)
        calls = self._log.tool_calls()
        return (content or None) if calls else content, calls


class NamedCallReader:
    """A named tool_choice: the grammar makes the whole reply that function's arguments."""

    def __init__(self, name: str) -> None:
        self._log = CallLog(1)
        self._name = name

    def feed(self, text: str, token_ids: Sequence[int] = (), final: bool = False) -> StreamStep:
        step = StreamStep()
        if not self._log.calls and (text or final):
            step.calls.append(self._log.open(self._name))
        if text:
            step.calls.append(self._log.extend(text))
        return step

    def reply(self) -> tuple[str | None, list[ToolCall]]:
        return None, self._log.tool_calls()


class ArrayCallReader:
    """`tool_choice: required`: the grammar makes the reply a JSON array of {name, parameters}."""

    def __init__(self, max_calls: int | None = None) -> None:
        self._log = CallLog(max_calls)
        self._text = ""
        self._pos = 0
        self._started = False
        self._call: _ObjectCall | None = None

    def feed(self, text: str, token_ids: Sequence[int] = (), final: bool = False) -> StreamStep:
        self._text += text
        step = StreamStep()
        while self._pos < len(self._text) and (self._call or not self._log.full):
            if self._call is None:
                c = self._text[self._pos]
                if c == "{" and self._started:
                    self._call = _ObjectCall(self._log, ("parameters",))
                    continue
                self._started = self._started or c == "["
                self._pos += 1
                continue
            self._pos += self._call.feed(self._text[self._pos:], step)
            if self._call.ended:
                self._call = None
        return step

    def reply(self) -> tuple[str | None, list[ToolCall]]:
        calls = self._log.tool_calls()
        return (None if calls else self._text), calls
