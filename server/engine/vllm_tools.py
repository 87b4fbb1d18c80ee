"""vLLM's tool-call parsers (`vllm serve --tool-call-parser NAME`) behind the server's ToolParser,
so that every model family vLLM knows is read the way vLLM reads it."""

from __future__ import annotations

from typing import Any

from server.tools import START, ToolCall, new_call_id


class VllmToolParser:
    def __init__(self, name: str, tokenizer: Any) -> None:
        from vllm.tool_parsers import ToolParserManager

        try:
            self._cls = ToolParserManager.get_tool_parser(name)
        except KeyError:
            known = ", ".join(sorted(ToolParserManager.list_registered()))
            raise ValueError(f"unknown tool call parser {name!r}; vLLM has: {known}") from None
        self._tokenizer = tokenizer
        self.name = name
        self.start = getattr(self._cls, "tool_call_start_token", START)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        parser = self._cls(self._tokenizer)   # a fresh one per reply: parsers keep streaming state
        request = ChatCompletionRequest(model="-", messages=[{"role": "user", "content": ""}])
        info = parser.extract_tool_calls(text, request)
        if not info.tools_called:
            return text, []
        calls = [ToolCall(c.id or new_call_id(), c.function.name, c.function.arguments) for c in info.tool_calls]
        return info.content or None, calls
