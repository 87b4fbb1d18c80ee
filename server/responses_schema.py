"""The Responses API request (`POST /v1/responses`) and its input items as chat messages.

Text in, text and function calls out. Items and tools this server cannot honour (images, files,
reasoning items, built-in tools, background runs, server-side conversations) are refused with a 400
naming them; a request that was not honoured never gets a 200.
"""

from __future__ import annotations

import json
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.engine.base import StructuredOutput
from server.prompt import ChatMessage
from server.schemas import (MAX_LOGPROBS, FunctionSpec, JsonSchemaFormat, _check_metadata, _GenerationBody,
                            _is_default)
from server.tools import ToolCall, forced_calls_schema

LOGPROBS_INCLUDE = "message.output_text.logprobs"
TEXT_PARTS = ("input_text", "output_text")


def _invalid(message: str, param: str, kind: str = "invalid_value") -> PydanticCustomError:
    return PydanticCustomError(kind, message, {"param": param})


class FunctionTool(BaseModel):
    """A function tool in the Responses shape (flat, not nested under `function`)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def chat_tool(self) -> dict[str, Any]:
        """The tool as chat templates take it."""
        fn = FunctionSpec(name=self.name, description=self.description, parameters=self.parameters,
                          strict=self.strict)
        return {"type": "function", "function": fn.model_dump(exclude_none=True)}


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "TextFormat":
        if self.type == "json_schema":
            JsonSchemaFormat(name=self.name or "", schema=self.schema_ or {})   # the same checks as chat's
        elif self.schema_ is not None or self.name is not None:
            raise _invalid("name and schema belong to format type 'json_schema'", "type")
        return self


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class ResponseRequest(_GenerationBody):
    _UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "background": _is_default(False), "background_options": _is_default({}), "conversation": _is_default(),
        "prompt": _is_default(), "max_tool_calls": _is_default(), "truncation": _is_default("disabled"),
        "context_management": _is_default([]), "access_programs": _is_default({}), "image": _is_default({}),
        "moderation": _is_default(), "reasoning": lambda v: not v or all(x is None for x in v.values()),
        "max_tokens": _is_default(), "n": _is_default(1),
    }

    input: str | list[Any]
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=128)
    max_output_tokens: int | None = Field(None, ge=1)
    store: bool = True
    metadata: dict[str, str] | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    _messages: list[ChatMessage] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _refuse_other_tools(cls, data: Any) -> Any:
        tools = data.get("tools") if isinstance(data, dict) else None
        for i, tool in enumerate(tools if isinstance(tools, list) else ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise _invalid(f"tool type {kind!r} is not supported: only function tools", f"tools.{i}.type",
                               "unsupported_parameter")
        return data

    @field_validator("metadata")
    @classmethod
    def _meta(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return _check_metadata(v)

    @field_validator("include")
    @classmethod
    def _include(cls, v: list[str] | None) -> list[str] | None:
        for item in v or ():
            if item != LOGPROBS_INCLUDE:
                raise ValueError(f"include {item!r} is not supported (only {LOGPROBS_INCLUDE!r})")
        return v

    @model_validator(mode="after")
    def _checks(self) -> "ResponseRequest":
        names = [t.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise _invalid("tool names must be unique", "tools")
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise _invalid("tool_choice needs tools", "tool_choice")
        if isinstance(self.tool_choice, FunctionChoice) and self.tool_choice.name not in names:
            raise _invalid("tool_choice names a function that is not in tools", "tool_choice")
        fmt = self.text.format if self.text else None
        if self.tool_choice not in (None, "none", "auto") and fmt is not None and fmt.type != "text":
            raise _invalid("text.format cannot be combined with a required or named tool_choice", "text.format")
        if self.previous_response_id is not None and self.delta_mem is not None and self.delta_mem.reset:
            raise _invalid("delta_mem.reset cannot continue from previous_response_id", "delta_mem.reset")
        self._messages = self._read_input()
        return self

    # --- input items → chat messages ----------------------------------------------------------------
    def _read_input(self) -> list[ChatMessage]:
        out = [ChatMessage("system", self.instructions)] if self.instructions else []
        items = [{"type": "message", "role": "user", "content": self.input}] if isinstance(self.input, str) \
            else self.input
        if not items:
            raise _invalid("input must not be empty", "input")
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise _invalid("an input item must be an object", f"input.{i}")
            kind = item.get("type", "message")
            if kind == "message":
                out.append(_message(item, i))
            elif kind == "function_call":
                call = _function_call(item, i)
                last = out[-1] if out else None
                if last is not None and last.role == "assistant":   # calls join the reply they belong to
                    out[-1] = ChatMessage("assistant", last.content, last.tool_calls + (call,))
                else:
                    out.append(ChatMessage("assistant", "", (call,)))
            elif kind == "function_call_output":
                _fields(item, i, {"type", "call_id", "output", "id", "status"}, {"call_id", "output"})
                out.append(ChatMessage("tool", _text(item["output"], f"input.{i}.output"), (), str(item["call_id"])))
            else:
                raise _invalid(f"input item type {kind!r} is not supported (message, function_call, "
                               "function_call_output)", f"input.{i}.type", "unsupported_parameter")
        return out

    def messages(self) -> list[ChatMessage]:
        return list(self._messages)

    # --- what the shared generation code reads ------------------------------------------------------
    def max_completion_limit(self) -> int | None:
        return self.max_output_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if LOGPROBS_INCLUDE in (self.include or ()) else None

    def choice(self) -> Any:
        """tool_choice in the chat shape ("auto" when tools are given without one)."""
        if isinstance(self.tool_choice, FunctionChoice):
            return {"type": "function", "function": {"name": self.tool_choice.name}}
        return self.tool_choice or ("auto" if self.tools else "none")

    def tool_dicts(self) -> list[dict[str, Any]]:
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.chat_tool() for t in self.tools]

    def structured_output(self) -> StructuredOutput | None:
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type == "json_object":
            return StructuredOutput("json_object")
        if fmt is not None and fmt.type == "json_schema":
            return StructuredOutput("json_schema", json.dumps(fmt.schema_ or {"type": "object"}))
        tools = self.tool_dicts()
        return forced_calls_schema(tools, self.choice()) if tools else None


def _fields(item: dict[str, Any], i: int, allowed: set[str], required: set[str]) -> None:
    for key in item:
        if key not in allowed:
            raise _invalid(f"unsupported parameter: 'input.{i}.{key}' is not implemented by this server",
                           f"input.{i}.{key}", "unsupported_parameter")
    for key in required:
        if key not in item:
            raise _invalid(f"missing required parameter: 'input.{i}.{key}'", f"input.{i}.{key}")


def _text(content: Any, param: str) -> str:
    """Text content: a string, or text parts (images, files and audio are not supported)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _invalid("content must be a string or a list of text parts", param)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise _invalid(f"content part type {kind!r} is not supported (input_text, output_text)",
                           f"{param}.{j}.type", "unsupported_parameter")
        texts.append(part["text"])
    return "".join(texts)


def _message(item: dict[str, Any], i: int) -> ChatMessage:
    _fields(item, i, {"type", "role", "content", "id", "status"}, {"role", "content"})
    role = item["role"]
    if role not in ("user", "assistant", "system", "developer"):
        raise _invalid(f"role {role!r} is not one of user, assistant, system, developer", f"input.{i}.role")
    return ChatMessage(role, _text(item["content"], f"input.{i}.content"))


def _function_call(item: dict[str, Any], i: int) -> ToolCall:
    _fields(item, i, {"type", "call_id", "name", "arguments", "id", "status"}, {"call_id", "name", "arguments"})
    if not all(isinstance(item[k], str) for k in ("call_id", "name", "arguments")):
        raise _invalid("call_id, name and arguments must be strings", f"input.{i}")
    return ToolCall(item["call_id"], item["name"], item["arguments"])
