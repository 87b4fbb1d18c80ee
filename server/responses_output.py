"""The Responses API's output (pure): the `response` object and its streamed events.

Item ids are derived from the response id (`msg_<hex>`, `fc_<hex>_<i>`), so the events of a stream,
the object that ends it and the stored copy that `GET` returns all name the same items.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from server.responses_schema import ResponseRequest
from server.tool_stream import CallDelta, ToolCall


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def _hex(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def message_id(response_id: str) -> str:
    return f"msg_{_hex(response_id)}"


def call_item_id(response_id: str, index: int) -> str:
    return f"fc_{_hex(response_id)}_{index}"


def message_item(response_id: str, text: str, logprobs: list[dict[str, Any]] | None,
                 status: str = "completed") -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []}
    if logprobs is not None:
        part["logprobs"] = logprobs
    return {"id": message_id(response_id), "type": "message", "status": status, "role": "assistant",
            "content": [part] if status == "completed" else []}


def call_item(response_id: str, index: int, call: ToolCall, status: str = "completed") -> dict[str, Any]:
    return {"id": call_item_id(response_id, index), "type": "function_call", "status": status,
            "call_id": call.id, "name": call.name, "arguments": call.arguments}


def output_items(response_id: str, content: str | None, calls: Sequence[ToolCall],
                 logprobs: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A message when there is content (or nothing else), then one item per function call."""
    items = [message_item(response_id, content or "", logprobs)] if content or not calls else []
    return items + [call_item(response_id, i, c) for i, c in enumerate(calls)]


@dataclass
class ResponseShape:
    """What a response object echoes from its request."""

    id: str
    created_at: int
    model: str
    body: ResponseRequest

    def object(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None = None,
               incomplete: str | None = None, error: dict[str, Any] | None = None,
               delta_mem: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.body
        fmt = b.text.format.model_dump(exclude_none=True, by_alias=True) if b.text and b.text.format else \
            {"type": "text"}
        choice = b.tool_choice.model_dump() if hasattr(b.tool_choice, "model_dump") else (b.tool_choice or "auto")
        obj: dict[str, Any] = {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "error": error, "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": b.store, "temperature": 1.0 if b.temperature is None else b.temperature,
            "text": {"format": fmt}, "tool_choice": choice,
            "tools": [t.model_dump(exclude_none=True) for t in b.tools or ()],
            "top_p": 1.0 if b.top_p is None else b.top_p, "truncation": "disabled", "usage": usage,
            "metadata": b.metadata or {},
        }
        if delta_mem is not None:
            obj["delta_mem"] = delta_mem
        return obj


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class ResponseEvents:
    """The server-sent events of one streamed response, in OpenAI's order: created, in_progress,
    then per output item added → deltas → done, then completed (or incomplete, or failed)."""

    response_id: str
    _seq: int = 0
    _index: int = -1                     # output_index of the open item
    _open: str | None = None             # "message" | "call" | None
    _text: list[str] = field(default_factory=list)
    _logprobs: list[dict[str, Any]] | None = None
    _calls: list[list[str]] = field(default_factory=list)   # [call_id, name, arguments]

    def event(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def start(self, obj: dict[str, Any]) -> list[str]:
        return [self.event("response.created", response=obj), self.event("response.in_progress", response=obj)]

    def content(self, text: str, logprobs: list[dict[str, Any]] | None = None) -> list[str]:
        out = [] if self._open == "message" else self._open_message()
        self._text.append(text)
        if logprobs is not None:
            self._logprobs = (self._logprobs or []) + logprobs
        out.append(self.event("response.output_text.delta", item_id=message_id(self.response_id),
                              output_index=self._index, content_index=0, delta=text, logprobs=logprobs or []))
        return out

    def call(self, delta: CallDelta) -> list[str]:
        out: list[str] = []
        if delta.id is not None:
            out += self._close()
            self._calls.append([delta.id, delta.name or "", ""])
            self._index, self._open = self._index + 1, "call"
            item = call_item(self.response_id, len(self._calls) - 1, ToolCall(delta.id, delta.name or "", ""),
                             "in_progress")
            out.append(self.event("response.output_item.added", output_index=self._index, item=item))
        if delta.arguments:
            self._calls[-1][2] += delta.arguments
            out.append(self.event("response.function_call_arguments.delta", output_index=self._index,
                                  item_id=call_item_id(self.response_id, len(self._calls) - 1),
                                  delta=delta.arguments))
        return out

    def finish(self, obj: dict[str, Any]) -> list[str]:
        out = self._close()
        if not obj["output"] or (self._index < 0 and obj["output"][0]["type"] == "message"):
            out = self._open_message() + self._close()    # an empty reply is still a message
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}[obj["status"]]
        return out + [self.event(kind, response=obj)]

    def fail(self, error: dict[str, Any], obj: dict[str, Any]) -> list[str]:
        return [self.event("error", code=error.get("code"), message=error.get("message"), param=error.get("param")),
                self.event("response.failed", response={**obj, "status": "failed",
                                                        "error": {"code": error.get("code") or "server_error",
                                                                  "message": error.get("message")}})]

    def _open_message(self) -> list[str]:
        self._index, self._open = self._index + 1, "message"
        item_id = message_id(self.response_id)
        return [self.event("response.output_item.added", output_index=self._index,
                           item=message_item(self.response_id, "", None, "in_progress")),
                self.event("response.content_part.added", item_id=item_id, output_index=self._index, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": []})]

    def _close(self) -> list[str]:
        out: list[str] = []
        if self._open == "message":
            item = message_item(self.response_id, "".join(self._text), self._logprobs)
            part = item["content"][0]
            out = [self.event("response.output_text.done", item_id=item["id"], output_index=self._index,
                              content_index=0, text=part["text"], logprobs=self._logprobs or []),
                   self.event("response.content_part.done", item_id=item["id"], output_index=self._index,
                              content_index=0, part=part),
                   self.event("response.output_item.done", output_index=self._index, item=item)]
        elif self._open == "call":
            i = len(self._calls) - 1
            item = call_item(self.response_id, i, ToolCall(*self._calls[i]))
            out = [self.event("response.function_call_arguments.done", item_id=item["id"], output_index=self._index,
                              arguments=item["arguments"]),
                   self.event("response.output_item.done", output_index=self._index, item=item)]
        self._open = None
        return out
