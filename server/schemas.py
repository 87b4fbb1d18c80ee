"""Request bodies (pydantic). Responses are built as plain dicts in the routes (OpenAI's shapes).

Every field we read is validated so that a bad value is a 400, never a 500 further down, and a
generation request with a field we do not implement is a 400 naming it, never a silent 200.
"""

from __future__ import annotations

import json
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from server.engine.base import StructuredOutput
from server.prompt import ChatMessage
from server.tools import ToolCall, forced_calls_schema

MAX_SEED = 2**64 - 1
MIN_SEED = -(2**63)
MAX_TTL = 10 * 365 * 86400.0
MAX_CHOICES = 16


class DeltaMemOptions(BaseModel):
    """Per-request Δ-Mem options (body field `delta_mem`)."""

    model_config = ConfigDict(extra="forbid")
    write: bool = True
    reset: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    arguments: str


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant message, as the server returned it."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None     # assistant messages
    tool_call_id: str | None = None                # tool messages: the call this result answers

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> "ChatMessageIn":
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("invalid_value", "only assistant messages have tool_calls",
                                      {"param": "tool_calls"})
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("invalid_value", "a tool message needs the tool_call_id it answers",
                                      {"param": "tool_call_id"})
        return self

    def to_message(self) -> ChatMessage:
        """What the template and the session log see (ValueError for content we cannot render)."""
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        return ChatMessage(self.role, self.text(), calls, self.tool_call_id)

    def text(self) -> str:
        """The message as text; only text content parts are supported."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part type {part.type!r} is not supported (text only)")
            parts.append(part.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """Where in a JSON value a string holds an unpaired surrogate (JSON allows the escape; no
    tokenizer can encode it), as a dotted path; None when there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or None
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate_at(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def refuse_lone_surrogates(data: Any) -> None:
    where = lone_surrogate_at(data)
    if where is not None:
        raise PydanticCustomError("invalid_value", "text must be valid Unicode: a lone UTF-16 surrogate "
                                  "(an unpaired \\ud800–\\udfff escape) is not a character", {"param": where})


def _is_default(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or any(v == a for a in allowed)


class _GenerationBody(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions.

    Unknown fields are refused (400 naming the field), and so are the OpenAI fields this server does
    not implement, unless they carry their default: a client must never get a 200 for a request
    that was not honoured.
    """

    model_config = ConfigDict(extra="forbid")
    # OpenAI fields with no effect on the output here, accepted as hints
    _HINTS: ClassVar[tuple[str, ...]] = ("user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                                         "prompt_cache_options")
    # OpenAI fields not implemented (yet): accepted only with their default value
    _UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = {}

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    service_tier: str | None = None
    # vLLM's sampling extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0, le=10, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False
    # Δ-Mem extensions
    session_id: str | None = None
    delta_mem: DeltaMemOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unimplemented(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        refuse_lone_surrogates(data)
        for name, is_default in cls._UNSUPPORTED.items():
            if name in data and not is_default(data[name]):
                raise PydanticCustomError("unsupported_parameter", "unsupported parameter: '{param}' is not implemented by this server",
                                          {"param": name})
        return {k: v for k, v in data.items() if k not in cls._UNSUPPORTED and k not in cls._HINTS}

    @field_validator("service_tier")
    @classmethod
    def _tier(cls, v: str | None) -> str | None:
        if v not in (None, "auto", "default"):
            raise ValueError("only service_tier 'auto' or 'default' is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("at most 1024 logit_bias entries")
        for key, val in v.items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100 <= val <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {val}")
        return v

    @model_validator(mode="after")
    def _min_tokens_fit(self) -> "_GenerationBody":
        limit = self.max_completion_limit()
        if limit is not None and self.min_tokens > limit:
            raise PydanticCustomError("invalid_value", "min_tokens ({min}) must not exceed the maximum number of "
                                      "tokens ({max})", {"min": self.min_tokens, "max": limit, "param": "min_tokens"})
        return self

    def max_completion_limit(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        """How many alternatives per token to report (None: no logprobs)."""
        return None

    def structured_output(self) -> StructuredOutput | None:
        return None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


MAX_LOGPROBS = 20


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None   # the schema is always enforced, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`; JSON is enforced by grammar-constrained decoding on both engines."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> "ResponseFormat":
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError("invalid_value", "json_schema is required with type 'json_schema' and only "
                                      "then", {"param": "json_schema"})
        return self

    def structured_output(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput("json_object")
        return StructuredOutput("json_schema", json.dumps(self.json_schema.schema_ or {"type": "object"}))


class ChatCompletionRequest(_GenerationBody):
    _UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "functions": _is_default([]), "function_call": _is_default("none"), "audio": _is_default(),
        "modalities": _is_default(["text"]), "prediction": _is_default(), "web_search_options": _is_default(), "reasoning_effort": _is_default(), "verbosity": _is_default(),
        "store": _is_default(False), "metadata": _is_default(), "moderation": _is_default(),
    }

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def structured_output(self) -> StructuredOutput | None:
        if self.response_format:
            return self.response_format.structured_output()
        tools = self.tool_dicts()
        return forced_calls_schema(tools, self.choice()) if tools else None

    def choice(self) -> Any:
        """tool_choice as plain JSON ("auto" when tools are given without one, as OpenAI does)."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice or ("auto" if self.tools else "none")

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools the model is shown (none with tool_choice "none"), as chat templates take them."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.model_dump(exclude_none=True, by_alias=True) for t in self.tools]

    @model_validator(mode="after")
    def _tool_choice_fits(self) -> "ChatCompletionRequest":
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise PydanticCustomError("invalid_value", "tool names must be unique", {"param": "tools"})
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise PydanticCustomError("invalid_value", "tool_choice needs tools", {"param": "tool_choice"})
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise PydanticCustomError("invalid_value", "tool_choice names a function that is not in tools",
                                      {"param": "tool_choice"})
        forced = self.tool_choice not in (None, "none", "auto")
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise PydanticCustomError("invalid_value", "response_format cannot be combined with a required or "
                                      "named tool_choice", {"param": "response_format"})
        return self

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("invalid_value", "top_logprobs needs logprobs set to true",
                                      {"param": "top_logprobs"})
        return self

    def max_completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    def num_logprobs(self) -> int | None:
        return self.logprobs


def _check_metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    if v is None:
        return v
    if len(v) > 16:
        raise ValueError("at most 16 metadata entries")
    for key, val in v.items():
        if len(key) > 64 or len(val) > 512:
            raise ValueError("metadata keys are at most 64 characters and values at most 512")
    return v


class SessionCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    ttl: float | None = Field(None, gt=0, le=MAX_TTL, description="idle seconds before the session expires")
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _meta(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        return _check_metadata(v)


class SessionForkRequest(SessionCreateRequest):
    pass


def session_object(rec: Any, *, tier: str | None = None, state: Any = None, adapter_fingerprint: str | None = None,
                   include_tokens: bool = False, state_error: Any = None) -> dict[str, Any]:
    """The OpenAI-style `session` object; `state_error` (an APIError) says why its state cannot be used,
    as GET on the session would."""
    out: dict[str, Any] = {
        "id": rec.session_id,
        "object": "session",
        "created_at": int(rec.created_at),
        "last_used_at": int(rec.last_used_at),
        "ttl": rec.ttl,
        "expires_at": int(rec.last_used_at + rec.ttl) if rec.ttl is not None else None,
        "metadata": rec.metadata,
        "version": rec.version,
        "revision": rec.revision,
        "turns": rec.turns,
        "tokens_written": rec.tokens_written,
        "written_digest": rec.written_digest,
        "pending_tokens": len(rec.pending_token_ids),
        "last_response_id": rec.last_response_id,
        "residency": tier,
        "state_error": None if state_error is None else {"status": state_error.status, "code": state_error.code,
                                                         "message": state_error.body()["error"]["message"]},
    }
    if adapter_fingerprint is not None:
        out["adapter_fingerprint"] = adapter_fingerprint
    if state is not None:
        # in float64: no finite fp32 state then has an infinite norm (JSON would show it as null)
        out["state_norms"] = [float(x) for x in state.detach().double().flatten(1).norm(dim=1).cpu()]
    if include_tokens and rec.written_token_ids is not None:
        out["written_token_ids"] = rec.written_token_ids
    return out
