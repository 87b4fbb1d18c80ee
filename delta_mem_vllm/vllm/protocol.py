"""What crosses vLLM's process boundaries for Δ-Mem, as plain data (no vLLM import: tested alone).

A request tells the engine how to use its memory through `kv_transfer_params["deltamem"]`
(`TurnParams`): where writing starts, the initial state (raw fp32 bytes, ≈9 KB for Qwen3-4B, so
it travels with the request and survives preemption), and whether the final state is wanted back.
The scheduler-side connector turns that into per-step slot work (`SlotInit`, `SlotSave`) that the
worker side executes before the forward; a finished request's state then waits in the worker's
outbox (`SavedState`) until the engine takes it over `collective_rpc`. The model itself learns its
adapter directory and the tokenizer's vocabulary size from `hf_overrides` keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import CONFIG_FILE, DeltaMemConfig

PARAMS_KEY = "deltamem"
# name suffix of the per-layer state layers (`model.layers.{i}.self_attn.delta_mem.state`)
STATE_LAYER_SUFFIX = ".delta_mem.state"
# write_start of a read-only request: no position ever reaches it
NEVER_WRITE = 1 << 62
ADAPTER_KEY = "delta_mem_adapter"          # hf_overrides: the adapter directory
VALID_VOCAB_KEY = "delta_mem_valid_vocab"  # hf_overrides: ids at or above it are never sampled


class DeltaMemUnsupported(ValueError):
    """An adapter or backbone this engine cannot serve (the message says what to use instead)."""


def adapter_config(hf_config: Any) -> DeltaMemConfig:
    """The adapter's config, from the directory hf_overrides named; refuses what vLLM cannot serve."""
    path = getattr(hf_config, ADAPTER_KEY, None)
    if not path:
        raise DeltaMemUnsupported(f"a Δ-Mem model needs hf_overrides[{ADAPTER_KEY!r}] = the adapter directory")
    config = DeltaMemConfig.load(Path(path) / CONFIG_FILE)
    check_servable(config)
    return config


def check_servable(config: DeltaMemConfig) -> None:
    if config.memory_write_granularity != "token":
        raise DeltaMemUnsupported(
            f"memory_write_granularity={config.memory_write_granularity!r}: the vLLM engine serves token-write "
            "adapters only; serve segment-write adapters with the embedded engine (--engine torch)")
    if tuple(config.target_modules) != ("self_attn",):
        raise DeltaMemUnsupported(f"target_modules={list(config.target_modules)}: the vLLM engine attaches "
                                  "Δ-Mem to `self_attn` modules only")


class TurnParamsError(ValueError):
    """kv_transfer_params that cannot describe a Δ-Mem turn."""


@dataclass(frozen=True)
class TurnParams:
    """How one engine request uses Δ-Mem.

    write_start: absolute position of the first written token (earlier tokens read only);
        NEVER_WRITE makes the request read-only.
    state: the initial state as little-endian fp32 bytes of shape `state_shape`; None = zeros.
    save_key: when set, the final state is kept in the worker's outbox under this key.
    """

    write_start: int = 0
    state: bytes | None = None
    state_shape: tuple[int, ...] | None = None
    save_key: str | None = None

    @classmethod
    def build(cls, *, write_start: int = 0, write: bool = True, state: torch.Tensor | None = None,
              save_key: str | None = None) -> "TurnParams":
        raw, shape = encode_state(state) if state is not None else (None, None)
        return cls(write_start=write_start if write else NEVER_WRITE, state=raw, state_shape=shape,
                   save_key=save_key)

    def to_kv_transfer_params(self) -> dict[str, Any]:
        body: dict[str, Any] = {"write_start": self.write_start}
        if self.state is not None:
            body["state"] = self.state
            body["state_shape"] = list(self.state_shape or ())
        if self.save_key is not None:
            body["save_key"] = self.save_key
        return {PARAMS_KEY: body}

    @classmethod
    def from_kv_transfer_params(cls, params: dict[str, Any] | None) -> "TurnParams":
        """Parse what a request carries; no Δ-Mem entry means a plain request (zero state, all written)."""
        body = (params or {}).get(PARAMS_KEY)
        if body is None:
            return cls()
        if not isinstance(body, dict):
            raise TurnParamsError(f"kv_transfer_params[{PARAMS_KEY!r}] must be an object")
        ws = body.get("write_start", 0)
        if not isinstance(ws, int) or isinstance(ws, bool) or ws < 0:
            raise TurnParamsError(f"write_start must be a non-negative integer, got {ws!r}")
        state, shape = body.get("state"), body.get("state_shape")
        if state is not None:
            if not isinstance(state, (bytes, bytearray)) or not isinstance(shape, (list, tuple)):
                raise TurnParamsError("state must be raw bytes with a state_shape")
            shape = tuple(int(d) for d in shape)
            if len(state) != 4 * int(np.prod(shape)):
                raise TurnParamsError(f"state has {len(state)} bytes, state_shape {shape} needs {4 * int(np.prod(shape))}")
        key = body.get("save_key")
        if key is not None and not isinstance(key, str):
            raise TurnParamsError("save_key must be a string")
        return cls(write_start=ws, state=bytes(state) if state is not None else None,
                   state_shape=shape if state is not None else None, save_key=key)

    def state_tensor(self) -> torch.Tensor | None:
        return None if self.state is None else decode_state(self.state, self.state_shape)


def encode_state(state: torch.Tensor) -> tuple[bytes, tuple[int, ...]]:
    """A state as little-endian fp32 bytes and its shape: compact on every wire vLLM uses."""
    host = state.detach().to("cpu", torch.float32).contiguous()
    return host.numpy().astype("<f4", copy=False).tobytes(), tuple(host.shape)


def decode_state(raw: bytes, shape: tuple[int, ...] | list[int]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(raw, dtype="<f4").copy()).view(tuple(shape))


@dataclass(frozen=True)
class SlotInit:
    """Fill a newly allocated slot (one per Δ-Mem KV-cache group) before the request's first forward."""

    request_id: str
    slots: tuple[int, ...]
    write_start: int
    state: bytes | None = None
    state_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SlotSave:
    """Copy a finished request's slot out. `slots` is None when the request held none (it was
    preempted and not resumed): its state is then the initial one and covers no token."""

    key: str
    request_id: str
    slots: tuple[int, ...] | None
    num_tokens: int


@dataclass
class SavedState:
    """A finished request's state in the worker outbox (state None = unchanged initial state) and the
    number of the request's tokens (prompt first) it covers."""

    state: torch.Tensor | None
    num_tokens: int
    created: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"num_tokens": self.num_tokens}
        if self.state is not None:
            wire["state"], wire["state_shape"] = encode_state(self.state)
        return wire

    @staticmethod
    def state_from_wire(wire: dict[str, Any]) -> torch.Tensor | None:
        """The state of a `to_wire` dict (None: the request's initial state, unchanged)."""
        return decode_state(wire["state"], wire["state_shape"]) if "state" in wire else None


def turn_token_split(prompt: list[int], generated: list[int], write_start: int,
                     num_covered: int) -> tuple[list[int], list[int]]:
    """(written, pending) token ids of a finished write request from the number of tokens its state
    covers (the engine's count, never a guess). Tokens before write_start are read-only context;
    tokens after the covered ones were not processed and are written first in the next turn."""
    tokens = prompt + generated
    if not 0 <= num_covered <= len(tokens):
        raise ValueError(f"the state covers {num_covered} tokens of a {len(tokens)}-token turn")
    written = tokens[write_start:num_covered] if num_covered > write_start else []
    return written, tokens[max(num_covered, write_start):]
