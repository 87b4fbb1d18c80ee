"""Tool calling without a framework (pure): what the chat template is given, how tool calls are read
back from the model's text, and how `tool_choice` required/named becomes a JSON schema.

The built-in parser reads the Hermes/Qwen form, `<tool_call>{"name": …, "arguments": …}</tool_call>`,
which Qwen2.5/Qwen3 and SmolLM3 templates teach their models. Other families use vLLM's parsers
(`--tool-call-parser NAME` when vLLM is installed, server/engine/vllm_tools.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from server.engine.base import StructuredOutput

START, END = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(START) + r"\s*(.*?)\s*(?:" + re.escape(END) + r"|$)", re.DOTALL)


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


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolParser(Protocol):
    """Splits a finished reply into (content, tool calls)."""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]: ...


class HermesToolParser:
    """`<tool_call>{json}</tool_call>` blocks anywhere in the reply; the text around them is content.
    A block that does not hold a JSON object with a string `name` is left in the content."""

    start = START

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls: list[ToolCall] = []
        kept: list[str] = []
        pos = 0
        for match in _CALL.finditer(text):
            call = _call_from_json(match.group(1))
            if call is None:
                continue
            kept.append(text[pos:match.start()])
            pos = match.end()
            calls.append(call)
        kept.append(text[pos:])
        content = "".join(kept).strip()
        return (content or None) if calls else text, calls


def _call_from_json(raw: str) -> ToolCall | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(new_call_id(), obj["name"], arguments)


class ContentGate:
    """While streaming a reply that may call tools: pass content through until a tool-call block
    begins (holding back text that could still turn into its start marker), then nothing."""

    def __init__(self, start: str = START) -> None:
        self._start = start
        self._text = ""
        self._sent = 0
        self.calling = False

    def feed(self, delta: str) -> str:
        if self.calling:
            return ""
        self._text += delta
        at = self._text.find(self._start, self._sent)
        if at >= 0:
            self.calling = True
            out, self._sent = self._text[self._sent:at], at
            return out
        safe = len(self._text)
        for k in range(min(len(self._start) - 1, len(self._text)), 0, -1):
            if self._start.startswith(self._text[-k:]):
                safe -= k
                break
        out, self._sent = self._text[self._sent:safe], max(self._sent, safe)
        return out

    def flush(self) -> str:
        """The end of a reply without a tool call: release what was held back."""
        if self.calling:
            return ""
        out, self._sent = self._text[self._sent:], len(self._text)
        return out


# --- tool_choice as a grammar ------------------------------------------------------------------------
def forced_calls_schema(tools: Sequence[dict[str, Any]], choice: Any) -> StructuredOutput | None:
    """`required`: a JSON array of one or more {name, parameters} of the given tools; a named
    function: that function's parameters. None for `auto`/`none` (the model decides)."""
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        fn = next(t["function"] for t in tools if t["function"]["name"] == name)
        return StructuredOutput("json_schema", json.dumps(fn.get("parameters") or {"type": "object"}))
    if choice == "required":
        options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                      "parameters": t["function"].get("parameters") or {"type": "object"}},
                    "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
        return StructuredOutput("json_schema", json.dumps({"type": "array", "minItems": 1, "items": {"anyOf": options}}))
    return None


def forced_calls(text: str, choice: Any) -> list[ToolCall]:
    """The tool calls of a reply decoded under forced_calls_schema (empty if it was cut short)."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if isinstance(choice, dict):
        return [ToolCall(new_call_id(), choice["function"]["name"], json.dumps(value, ensure_ascii=False))]
    return [ToolCall(new_call_id(), item["name"], json.dumps(item["parameters"], ensure_ascii=False))
            for item in value if isinstance(item, dict) and "name" in item]


def tools_identity(tools: Sequence[dict[str, Any]]) -> str:
    """A session's message-log entry for a tool list (written once, like a system message)."""
    blob = json.dumps(list(tools), sort_keys=True, ensure_ascii=False)
    return "tools:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


class ToolUse:
    """How one reply is read back when tools were offered: `auto` parses the text, a required or
    named tool_choice reads the JSON the grammar forced; `parallel=False` keeps the first call."""

    def __init__(self, choice: Any, parser: ToolParser, parallel: bool = True) -> None:
        self.choice, self.parser, self.parallel = choice, parser, parallel
        self.forced = choice not in ("auto", "none")

    def read(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.forced:   # the reply is the calls' JSON; cut short, it is left as content
            calls = forced_calls(text, self.choice)
            content = None if calls else text
        else:
            content, calls = self.parser.parse(text)
        return content, calls if self.parallel else calls[:1]

    def gate(self) -> ContentGate | None:
        """What filters streamed content: nothing is content under a forced choice."""
        return None if self.forced else ContentGate(getattr(self.parser, "start", START))
