"""Request bodies (pydantic). Responses are built as plain dicts in the routes (OpenAI's shapes).

Unknown fields are ignored, as OpenAI-compatible servers do, but every field we read is validated
so that a bad value is a 400, never a 500 further down.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SEED = 2**64 - 1
MIN_SEED = -(2**63)
MAX_TTL = 10 * 365 * 86400.0


class DeltaMemOptions(BaseModel):
    """Per-request Δ-Mem options (body field `delta_mem`)."""

    model_config = ConfigDict(extra="forbid")
    write: bool = True
    reset: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

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


class _GenerationBody(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logprobs: bool | int | None = None
    user: str | None = None
    # extensions
    session_id: str | None = None
    delta_mem: DeltaMemOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False

    @field_validator("n")
    @classmethod
    def _only_one(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("only n=1 is supported")
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

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float | None) -> float | None:
        if v:
            raise ValueError("penalties are not supported (only 0)")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | int | None) -> bool | int | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

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
                   include_tokens: bool = False) -> dict[str, Any]:
    """The OpenAI-style `session` object."""
    out: dict[str, Any] = {
        "id": rec.session_id,
        "object": "session",
        "created_at": int(rec.created_at),
        "last_used_at": int(rec.last_used_at),
        "ttl": rec.ttl,
        "expires_at": int(rec.last_used_at + rec.ttl) if rec.ttl is not None else None,
        "metadata": rec.metadata,
        "version": rec.version,
        "turns": rec.turns,
        "tokens_written": rec.tokens_written,
        "written_digest": rec.written_digest,
        "pending_tokens": len(rec.pending_token_ids),
        "residency": tier,
    }
    if adapter_fingerprint is not None:
        out["adapter_fingerprint"] = adapter_fingerprint
    if state is not None:
        out["state_norms"] = [float(x) for x in state.detach().float().flatten(1).norm(dim=1).cpu()]
    if include_tokens and rec.written_token_ids is not None:
        out["written_token_ids"] = rec.written_token_ids
    return out
