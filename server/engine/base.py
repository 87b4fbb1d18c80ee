"""The engine protocol the server talks to.

Token-id based and async so that a vLLM engine (AsyncLLM + the Δ-Mem plugin, states in a GPU slot
pool) can implement it without the server changing: the server renders and splits the prompt,
the engine only runs tokens. State tensors cross this boundary as fp32 [L, h, R, R].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Protocol, runtime_checkable

import torch

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class StructuredOutput:
    """What the reply must be: any JSON object, or JSON valid against `schema` (a JSON string).
    Both engines decode it with xgrammar as compact JSON (no optional whitespace)."""

    kind: Literal["json_object", "json_schema"]
    schema: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    """What to sample, with vLLM's meaning for every field (both engines must agree on greedy tokens).

    temperature 0 = greedy. `stop` strings are matched on the decoded text. top_k 0 = off.
    Penalties follow vLLM: repetition over prompt and output tokens, presence/frequency over output
    tokens. min_tokens: EOS, stop ids and stop strings are ignored until that many tokens exist.
    logprobs: None = none; k = the sampled token's log-probability plus the k most likely (raw
    log-softmax of the model's logits, before any processing but the grammar of `structured`, as
    vLLM reports them).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    structured: StructuredOutput | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the `top` most likely alternatives (id, logprob)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class MemorySpec:
    """How this request uses Δ-Mem.

    initial_state: fp32 [L,h,R,R] to start from (None = zero state).
    write_start: leading prompt tokens that are read-only (the session's context-only part).
    write: False = read-only request (the state is returned unchanged).
    cache_salt: KV-prefix-cache identity; two requests may share cached KV only when their salts match
                (the initial state changes every layer's K/V after the first).
    message_ids / sentence_ids: per prompt token, for segment-write adapters (−1 = in no segment);
                required when the engine's write_granularity is not "token".
    return_state: whether the caller needs `final_state` and the written/pending split (a session
                turn does; a stateless request does not, which spares the vLLM engine fetching it).
    """

    initial_state: torch.Tensor | None = None
    write_start: int = 0
    write: bool = True
    cache_salt: str | None = None
    return_state: bool = True
    message_ids: tuple[int, ...] | None = None
    sentence_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    memory: MemorySpec = MemorySpec()


@dataclass
class GenerationOutput:
    """One streamed increment. The last one has `finished=True` and the turn's outcome.

    written_token_ids: exactly the tokens whose writes are in `final_state`, in order
        (prompt[write_start:] followed by the generated tokens the engine fed back).
    pending_token_ids: generated tokens the engine did not process (at least the last sampled one);
        a session writes them first in its next turn.
    """

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None   # one per token id, when sampling.logprobs is set
    finished: bool = False
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    final_state: torch.Tensor | None = None
    written_token_ids: list[int] | None = None
    pending_token_ids: list[int] | None = None
    error: str | None = None


class EngineError(RuntimeError):
    """The engine failed a request (not the client's fault)."""


class RequestRejected(EngineError):
    """The engine refused a request for what it asks (e.g. a schema it cannot compile): a 400, raised
    before any output. `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@runtime_checkable
class Engine(Protocol):
    """What the server needs from an inference engine."""

    model_name: str
    tokenizer: Any                      # a transformers tokenizer (chat template, decode)
    max_model_len: int
    state_shape: tuple[int, int, int, int]   # (L, h, R, R)
    layer_names: list[str]
    adapter_fingerprint: str
    model_fingerprint: str
    device: torch.device                # where states live between requests (the store's device tier)
    eos_token_ids: tuple[int, ...]
    write_granularity: str              # "token", "message_mean" or "sentence_mean" (the adapter's)

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Cancel whatever is still running and release the device."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream increments; closing the iterator early aborts the request (nothing is reported)."""

    def zero_state(self) -> torch.Tensor:
        """A fresh fp32 [L,h,R,R] state on the engine's device."""

    async def import_state(self, state: torch.Tensor) -> torch.Tensor:
        """Validate a host fp32 [L,h,R,R] state and place it where the engine reads initial states."""

    async def export_state(self, state: torch.Tensor) -> torch.Tensor:
        """An engine state as a host fp32 [L,h,R,R] tensor (for persistence and export)."""

    def health(self) -> dict[str, Any]:
        """Liveness details for /ready (e.g. worker alive, active requests)."""
