"""Tool calling without a framework (pure): what the chat template is given, how tool calls are read
back from the model's text, and how `tool_choice` required/named becomes a JSON schema.

The built-in parser reads the Hermes/Qwen form, `<tool_call>{"name": …, "arguments": …}</tool_call>`,
which Qwen2.5/Qwen3 and SmolLM3 templates teach their models. Other families use vLLM's parsers
(`--tool-call-parser NAME` when vLLM is installed, server/engine/vllm_tools.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol, Sequence

from server.engine.base import StructuredOutput
from server.tool_stream import (START, ArrayCallReader, CallReader, HermesCallReader, NamedCallReader, ToolCall,
                                new_call_id)

__all__ = ["START", "ToolCall", "ToolParser", "HermesToolParser", "ToolUse", "forced_calls_schema", "new_call_id",
           "tools_identity"]


class ToolParser(Protocol):
    """Reads tool calls from a reply: whole (`parse`) or as it streams (`reader`)."""

    start: str

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]: ...

    def reader(self, max_calls: int | None = None) -> CallReader: ...


class HermesToolParser:
    """`<tool_call>{json}</tool_call>` blocks after the content; a block that does not name a function
    is content when the reply makes no call. A whole reply is read as if it streamed."""

    start = START

    def reader(self, max_calls: int | None = None) -> CallReader:
        return HermesCallReader(max_calls, self.start)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        reader = self.reader()
        reader.feed(text, final=True)
        return reader.reply()


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


def tools_identity(tools: Sequence[dict[str, Any]]) -> str:
    """A session's message-log entry for a tool list (written once, like a system message)."""
    blob = json.dumps(list(tools), sort_keys=True, ensure_ascii=False)
    return "tools:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


class ToolUse:
    """How one reply is read back when tools were offered: `auto` by the parser, a required or named
    tool_choice from the JSON the grammar forced; `parallel=False` keeps the first call."""

    def __init__(self, choice: Any, parser: ToolParser, parallel: bool = True) -> None:
        self.choice, self.parser, self.parallel = choice, parser, parallel
        self.forced = choice not in ("auto", "none")

    def reader(self) -> CallReader:
        """A reader for one streamed reply."""
        most = None if self.parallel else 1
        if isinstance(self.choice, dict):
            return NamedCallReader(self.choice["function"]["name"])
        if self.choice == "required":
            return ArrayCallReader(most)
        return self.parser.reader(most)

    def read(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A whole reply: the parser's own reading for `auto`, else as if it streamed."""
        if not self.forced:
            content, calls = self.parser.parse(text)
            return content, calls if self.parallel else calls[:1]
        reader = self.reader()
        reader.feed(text, final=True)
        return reader.reply()
