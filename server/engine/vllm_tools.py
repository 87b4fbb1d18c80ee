"""vLLM's tool-call parsers (`vllm serve --tool-call-parser NAME`) behind the server's ToolParser,
so that every model family vLLM knows is read the way vLLM reads it, whole or streamed."""

from __future__ import annotations

from typing import Any, Sequence

from server.tool_stream import START, CallLog, StreamStep, ToolCall, new_call_id


def unknown_parser(name: str) -> str | None:
    """Why `--tool-call-parser NAME` cannot work, or None: checked at startup so that a typo fails
    before the model loads. Imports vLLM only here, as the CLI must not."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "only hermes is built in; the others are vLLM's"
    from vllm.tool_parsers import ToolParserManager

    if name not in ToolParserManager.list_registered():
        return "vLLM has no parser of that name"
    return None


def _request() -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest(model="-", messages=[{"role": "user", "content": ""}])


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
        parser = self._cls(self._tokenizer)   # a fresh one per reply: parsers keep streaming state
        info = parser.extract_tool_calls(text, _request())
        if not info.tools_called:
            return text, []
        calls = [ToolCall(c.id or new_call_id(), c.function.name, c.function.arguments) for c in info.tool_calls]
        return info.content or None, calls

    def reader(self, max_calls: int | None = None) -> "VllmCallReader":
        return VllmCallReader(self._cls(self._tokenizer), max_calls)


class VllmCallReader:
    """A vLLM parser's streaming extraction, turned into our call deltas. The reply is what was
    streamed; a reply that made no call is all content (including text the parser held back)."""

    def __init__(self, parser: Any, max_calls: int | None) -> None:
        self._parser, self._request = parser, _request()
        self._log = CallLog(max_calls)
        self._text, self._ids = "", []
        self._content: list[str] = []
        self._index: dict[int, int] = {}     # the parser's call index -> ours

    def feed(self, text: str, token_ids: Sequence[int] = (), final: bool = False) -> StreamStep:
        prev_text, prev_ids = self._text, list(self._ids)
        self._text, self._ids = prev_text + text, prev_ids + list(token_ids)
        step = StreamStep()
        delta = None
        if text or token_ids:
            delta = self._parser.extract_tool_calls_streaming(prev_text, self._text, text, prev_ids, self._ids,
                                                              list(token_ids), self._request)
        if delta is not None:
            if delta.content and not self._log.calls:
                step.content = delta.content
            for tc in delta.tool_calls or ():
                self._add(tc, step)
        sent = "".join(self._content) + step.content
        if final and not self._log.calls and self._text.startswith(sent):
            step.content += self._text[len(sent):]
        self._content.append(step.content)
        return step

    def _add(self, tc: Any, step: StreamStep) -> None:
        fn = tc.function if isinstance(tc.function, dict) else (tc.function.model_dump() if tc.function else {})
        ours = self._index.get(tc.index)
        name = fn.get("name")
        if ours is None:
            if not name or self._log.full:
                return
            step.calls.append(self._log.open(name, tc.id))
            ours = self._index[tc.index] = len(self._log.calls) - 1
        args = fn.get("arguments")
        if args and ours == len(self._log.calls) - 1:
            step.calls.append(self._log.extend(args))

    def reply(self) -> tuple[str | None, list[ToolCall]]:
        content = "".join(self._content)
        calls = self._log.tool_calls()
        return (content or None) if calls else content, calls
