"""Δ-Mem on any transformers decoder, through hooks on the attention's q/k/v/o projections.

We never copy the model's attention code: a pre-hook on each wrapped attention module runs the
memory step on its input (the post-norm hidden states), and forward hooks on `q_proj/k_proj/v_proj`
and `o_proj` add the corrections. So the corrections land before q/k norms and RoPE and enter the KV
cache, exactly as in the reference, under every attention implementation and cache API.

Token validity and write permissions come from the call's own metadata (the attention mask the
caller passes and a per-row write-start offset), never from parsing the 4-D masks transformers
builds — which is where the reference breaks under SDPA.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapter import Adapter, AdapterError, assign_adapter, load_adapter
from ..config import DELTA_HEADS, DeltaMemConfig
from ..ops.memory import DeltaMemLayer

if TYPE_CHECKING:
    from ..state import Snapshot

Tensor = torch.Tensor
STATE_MANIFEST_FILE = "manifest.json"


@dataclass
class DeltaMemOutput:
    logits: Tensor
    state: Tensor                        # [B, L, h, R, R] fp32, a new tensor
    past_key_values: Any = None


@dataclass
class _Call:
    """Per-forward metadata the hooks read; lives only for the duration of one call."""

    state: Tensor                        # [B, L, h, R, R] fp32 (input, never written)
    valid: Tensor | None                 # [B, T] bool; None = every token is real
    writes: Tensor | None                # [B, T] bool, subset of valid; None = every token writes
    segment_ids: Tensor | None
    new_state: list[Tensor | None] = field(default_factory=list)
    reads: dict[int, Tensor] = field(default_factory=dict)


def find_attention_modules(model: nn.Module, config: DeltaMemConfig) -> list[tuple[str, nn.Module]]:
    """Attention modules to wrap: name suffix in target_modules, separate q/k/v/o projections."""
    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in config.target_modules:
            continue
        if not all(isinstance(getattr(module, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            continue
        idx = _layer_index(name, module)
        if config.target_layers and idx not in config.target_layers:
            continue
        found.append((name, module))
    if not found:
        raise AdapterError(f"no attention module matches target_modules={list(config.target_modules)} "
                           f"and target_layers={list(config.target_layers)} in {type(model).__name__}")
    return found


def _layer_index(name: str, module: nn.Module) -> int | None:
    """The decoder layer an attention module belongs to: its `layer_idx`, else the last number in its name."""
    idx = getattr(module, "layer_idx", None)
    if idx is None:
        digits = re.findall(r"\.(\d+)\.", f".{name}.")
        idx = int(digits[-1]) if digits else None
    return idx


class _StopForward(Exception):
    """Raised by the capture hook of `hidden_states_before` once it has what it came for."""


class DeltaMemModel(nn.Module):
    """A transformers causal LM with Δ-Mem attached; the state is an explicit input and output.

    Outside a call of this object the hooks are inert, so `self.model` is the plain backbone (handy
    for baselines). Calls are serialised by a lock: the per-call metadata is shared by the hooks.
    """

    def __init__(self, model: nn.Module, adapter: Adapter | DeltaMemConfig | None = None) -> None:
        super().__init__()
        if isinstance(adapter, Adapter):
            config = adapter.config
        else:
            config, adapter = adapter or DeltaMemConfig(), None
        self.model = model.requires_grad_(False)   # the backbone is frozen; only Δ-Mem trains
        self.config = config
        self._lock = threading.RLock()
        self._call: _Call | None = None
        self._hooks: list[Any] = []
        self.layer_names: list[str] = []
        self.layer_indices: list[int | None] = []     # decoder layer of each memory layer
        self.layers = nn.ModuleList()
        ref = next(model.parameters())
        for name, attn in find_attention_modules(model, config):
            layer = DeltaMemLayer(config, attn.q_proj.in_features, attn.q_proj.out_features,
                                  attn.k_proj.out_features, attn.v_proj.out_features, attn.o_proj.out_features)
            layer.reset_parameters({h: getattr(attn, f"{h}_proj").weight for h in DELTA_HEADS})
            layer.to(device=ref.device, dtype=ref.dtype)
            self._attach(len(self.layers), attn, layer)
            self.layer_names.append(name)
            self.layer_indices.append(_layer_index(name, attn))
            self.layers.append(layer)
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.supports_logits_to_keep = "logits_to_keep" in params
        self._fingerprint: str | None = None
        if adapter is not None:
            self.load_adapter_weights(adapter)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_path: str | Path, adapter_path: str | Path | None = None, *,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        attn_implementation: str = "sdpa", **model_kwargs: Any) -> "DeltaMemModel":
        """Load a local transformers checkpoint and an adapter directory (reference or safetensors form)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype,
                                                     attn_implementation=attn_implementation, **model_kwargs)
        model.to(device).eval()
        adapter = load_adapter(adapter_path) if adapter_path is not None else None
        return cls(model, adapter).eval()

    def load_adapter_weights(self, adapter: Adapter) -> None:
        """Copy adapter tensors in; every parameter must be present with the exact shape."""
        if adapter.config != self.config:
            raise AdapterError("adapter config differs from the config this model was built with")
        assign_adapter(adapter, dict(zip(self.layer_names, self.layers)))
        self._fingerprint = adapter.fingerprint

    def adapter(self) -> Adapter:
        """The current Δ-Mem parameters as an adapter (reference key layout)."""
        tensors = {f"{n}.{p}": t.detach().cpu().clone() for n, layer in zip(self.layer_names, self.layers)
                   for p, t in layer.named_parameters()}
        return Adapter(self.config, tensors)

    @property
    def adapter_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.adapter().fingerprint
        return self._fingerprint

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        return (len(self.layers), *self.config.state_shape)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def zero_state(self, batch: int | None = None) -> Tensor:
        shape = self.state_shape if batch is None else (batch, *self.state_shape)
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    # --- state files ----------------------------------------------------------------------------
    def snapshot(self, state: Tensor, record: dict | None = None) -> "Snapshot":
        """Wrap one sequence's state [L,h,R,R] with the identity needed to reload it safely."""
        from ..state import Snapshot

        return Snapshot(state=state.detach().float(), record=dict(record or {}),
                        adapter_fingerprint=self.adapter_fingerprint, layer_names=list(self.layer_names))

    def save_state(self, directory: str | Path, state: Tensor, record: dict | None = None) -> Path:
        """Write a checksummed safetensors state + `manifest.json` into a directory, crash-safely.

        The tensor file is named by its checksum and written first; the manifest that points at it
        is replaced atomically last, so a crash leaves the old or the new state, never a mix.
        """
        from ..state import encode_snapshot

        data, manifest = encode_snapshot(self.snapshot(state, record))
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        data_file = f"state-{manifest['sha256'][:16]}.safetensors"
        _atomic_write(root / data_file, data)
        _atomic_write(root / STATE_MANIFEST_FILE, json.dumps({"data_file": data_file, "manifest": manifest}).encode())
        for old in root.glob("state-*.safetensors"):
            if old.name != data_file:
                old.unlink(missing_ok=True)
        return root

    def load_state(self, directory: str | Path) -> Tensor:
        """Read a state saved by `save_state`; another adapter, layout or a damaged file is an error."""
        from ..state import StateFormatError, decode_snapshot

        root = Path(directory)
        try:
            pointer = json.loads((root / STATE_MANIFEST_FILE).read_text())
            data = (root / Path(pointer["data_file"]).name).read_bytes()
            manifest = pointer["manifest"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StateFormatError(f"{root}: unreadable state ({exc})") from exc
        snap = decode_snapshot(data, manifest, expect_adapter_fingerprint=self.adapter_fingerprint,
                               expect_shape=self.state_shape, expect_layer_names=self.layer_names)
        return snap.state.to(self.device)

    # --- hooks ----------------------------------------------------------------------------------
    def _attach(self, index: int, attn: nn.Module, layer: DeltaMemLayer) -> None:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            call = self._call
            if call is None:
                return
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            reads, new_state = layer.memory_step(x, call.state[:, index], call.valid, call.writes, call.segment_ids)
            call.new_state[index] = new_state
            call.reads[index] = reads

        def correction_hook(head: str):
            def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
                call = self._call
                if call is None or index not in call.reads:
                    return None
                return layer.add_correction(head, output, call.reads[index])
            return hook

        def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._call is not None:
                self._call.reads.pop(index, None)

        self._hooks.append(attn.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for head in self.config.delta_heads:
            self._hooks.append(getattr(attn, f"{head}_proj").register_forward_hook(correction_hook(head)))
        self._hooks.append(attn.register_forward_hook(post_hook))

    def detach_hooks(self) -> None:
        """Remove every hook: `self.model` becomes the untouched backbone for good."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # --- the call -------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, state: Tensor | None = None,
                write_start: int | Tensor = 0, write: bool = True, past_key_values: Any = None,
                use_cache: bool = False, position_ids: Tensor | None = None,
                message_ids: Tensor | None = None, sentence_ids: Tensor | None = None,
                logits_to_keep: int = 0) -> DeltaMemOutput:
        """Run token ids [B,T] from an explicit initial state [B,L,h,R,R] (None = zeros).

        `attention_mask` follows the transformers convention ([B, past+T], 1 = real token; left or
        right padding). Of each row's real tokens in this call the first `write_start` are read-only;
        `write=False` makes the whole call read-only. `message_ids`/`sentence_ids` [B,T] drive the
        segment granularities and are ignored in token mode. `logits_to_keep=n` returns logits for
        the last n positions only (0 = all), sparing a prefill the full [T, vocab] projection.
        """
        B, T = input_ids.shape
        device = input_ids.device
        past_len = _cache_length(past_key_values)
        if attention_mask is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=device)
        else:
            attention_mask = attention_mask.to(device)
            if tuple(attention_mask.shape) != (B, past_len + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{(B, past_len + T)} (cached tokens + this call's tokens)")
            valid = attention_mask[:, -T:].bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=device).expand(B, T)
        ws = torch.as_tensor(write_start, device=device).reshape(-1, 1)
        rank = valid.long().cumsum(-1) - 1
        writes = valid & (rank >= ws) if write else torch.zeros_like(valid)
        if state is None:
            state = self.zero_state(B)
        if tuple(state.shape) != (B, *self.state_shape):
            raise ValueError(f"state has shape {tuple(state.shape)}, expected {(B, *self.state_shape)}")
        all_write = bool(writes.all())   # the common case (decode, fresh prefill) skips every mask op
        call = _Call(state=state.to(device=device, dtype=torch.float32), valid=None if all_write else valid,
                     writes=None if all_write else writes,
                     segment_ids=self._segment_ids(message_ids, sentence_ids, (B, T)),
                     new_state=[None] * len(self.layers))
        kwargs = {self._cache_kwarg: past_key_values}
        if logits_to_keep:
            if not self.supports_logits_to_keep:
                raise TypeError(f"{type(self.model).__name__} does not support logits_to_keep")
            kwargs["logits_to_keep"] = logits_to_keep
        with self._lock:
            self._call = call
            try:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=use_cache, **kwargs)
            finally:
                self._call = None
        new_state = torch.stack(call.new_state, dim=1)
        cache = getattr(out, self._cache_kwarg, None)
        return DeltaMemOutput(logits=out.logits, state=new_state, past_key_values=cache)

    # --- running the top of the decoder only (training on a frozen prefix) -------------------
    @property
    def first_memory_layer(self) -> int:
        """The lowest decoder layer with a memory: every layer below it is the plain, frozen backbone."""
        if any(i is None for i in self.layer_indices):
            raise AdapterError("the decoder layer of a memory layer is unknown (no layer_idx, no number in its name)")
        return min(self.layer_indices)

    def _decoder_layers(self) -> tuple[nn.Module, str]:
        """The module holding the decoder layers as a ModuleList, and that attribute's name."""
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else getattr(self.model, "model", None)
        for attr in ("layers", "h", "blocks"):
            if isinstance(getattr(decoder, attr, None), nn.ModuleList):
                return decoder, attr
        raise TypeError(f"{type(self.model).__name__}: cannot find its decoder layers")

    @torch.no_grad()
    def hidden_states_before(self, input_ids: Tensor, layer: int) -> Tensor:
        """The residual stream entering decoder `layer` ([B,T,H]), stopping the pass there.

        Exact for the Δ-Mem model too when `layer <= first_memory_layer`: the layers below are
        the frozen backbone. This is what lets training on top layers compute the prefix once.
        """
        decoder, attr = self._decoder_layers()
        captured: list[Tensor] = []

        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
            raise _StopForward

        handle = getattr(decoder, attr)[layer].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with self._lock:
                self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0].detach().clone()

    def forward_from(self, hidden: Tensor, layer: int, state: Tensor | None = None, write: bool = True,
                     logits_to_keep: int = 0, message_ids: Tensor | None = None) -> DeltaMemOutput:
        """Run decoder layers `layer`… and the head on `hidden` ([B,T,H], from `hidden_states_before`),
        positions from 0, no padding, no KV cache. Every memory layer must be at or above `layer`.

        Equal to `forward` on the same tokens (the test checks it); the layers below are not run.
        Backbones that rescale `inputs_embeds` inside their forward (e.g. Gemma) are not supported:
        check against `forward` once, as the trainer does.
        """
        if layer > self.first_memory_layer:
            raise ValueError(f"forward_from({layer}): a memory sits below, in decoder layer {self.first_memory_layer}")
        if len(set(getattr(self.model.config, "layer_types", None) or ())) > 1:
            raise NotImplementedError("forward_from: layers of different attention types (sliding windows) "
                                      "are indexed from 0 by the backbone's forward")
        B, T, _ = hidden.shape
        if state is None:
            state = self.zero_state(B)
        call = _Call(state=state.to(dtype=torch.float32), valid=None,
                     writes=None if write else torch.zeros(B, T, dtype=torch.bool, device=hidden.device),
                     segment_ids=self._segment_ids(message_ids, None, (B, T)), new_state=[None] * len(self.layers))
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        decoder, attr = self._decoder_layers()
        full = getattr(decoder, attr)
        with self._lock:
            setattr(decoder, attr, nn.ModuleList(list(full)[layer:]))
            self._call = call
            try:
                out = self.model(inputs_embeds=hidden, position_ids=torch.arange(T, device=hidden.device).expand(B, T),
                                 use_cache=False, **kwargs)
            finally:
                self._call = None
                setattr(decoder, attr, full)
        return DeltaMemOutput(logits=out.logits, state=torch.stack(call.new_state, dim=1))

    def _segment_ids(self, message_ids: Tensor | None, sentence_ids: Tensor | None,
                     shape: tuple[int, int]) -> Tensor | None:
        """Segment index per token for the segment granularities; None means token writes."""
        mode = self.config.memory_write_granularity
        if mode == "token" or message_ids is None or tuple(message_ids.shape) != shape:
            return None
        if mode == "message_mean":
            return message_ids.long()
        if sentence_ids is None or tuple(sentence_ids.shape) != shape:
            return None
        return torch.where(message_ids >= 0, sentence_ids.long(), torch.full_like(sentence_ids.long(), -1))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    raise TypeError(f"unsupported cache type {type(cache).__name__}: pass a transformers Cache")
