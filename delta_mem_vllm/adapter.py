"""Adapter files: the reference `delta_mem_adapter.pt` (read safely, tensors only) and our safetensors form.

An adapter is a config plus a flat tensor dict keyed `<attention module path>.<param name>`, e.g.
`model.layers.0.self_attn.memory_q_proj`. Its fingerprint is a content hash that
does not depend on the file format, so a state saved under one form is accepted under the other.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from safetensors.torch import load_file, save_file

from .config import CONFIG_FILE, DeltaMemConfig

REFERENCE_WEIGHTS_FILE = "delta_mem_adapter.pt"
SAFETENSORS_WEIGHTS_FILE = "delta_mem_adapter.safetensors"


class AdapterError(ValueError):
    """An adapter that cannot be used: unreadable, incomplete, or built for another backbone."""


@dataclass
class Adapter:
    config: DeltaMemConfig
    tensors: dict[str, torch.Tensor]
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def layer_names(self) -> list[str]:
        """The attention modules the adapter covers, in layer order (the rows of a state)."""
        names = {key.rsplit(".", 1)[0] for key in self.tensors}
        return sorted(names, key=lambda n: ([int(d) for d in re.findall(r"\d+", n)], n))

    @property
    def fingerprint(self) -> str:
        """sha256 over the canonical config and every tensor's name, shape and fp32 bytes."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            for name in sorted(self.tensors):
                t = self.tensors[name].detach().to("cpu", torch.float32).contiguous()
                h.update(f"\0{name}\0{list(t.shape)}\0".encode())
                h.update(t.numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def load_adapter(path: str | Path) -> Adapter:
    """Load an adapter directory: the config plus safetensors weights if present, else the reference .pt."""
    root = Path(path)
    if root.is_file():
        root = root.parent
    if not root.is_dir():
        raise AdapterError(f"adapter directory not found: {root}")
    config = DeltaMemConfig.load(root / CONFIG_FILE)
    st, pt = root / SAFETENSORS_WEIGHTS_FILE, root / REFERENCE_WEIGHTS_FILE
    if st.is_file():
        try:
            tensors = load_file(str(st))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise AdapterError(f"{st}: unreadable safetensors file ({exc})") from exc
    elif pt.is_file():
        tensors = _load_reference_weights(pt)
    else:
        raise AdapterError(f"{root}: no {SAFETENSORS_WEIGHTS_FILE} or {REFERENCE_WEIGHTS_FILE}")
    return Adapter(config, {k: v.detach().cpu() for k, v in tensors.items()})


def assign_adapter(adapter: Adapter, layers: Mapping[str, nn.Module]) -> None:
    """Copy an adapter into Δ-Mem layers keyed by attention module path (`model.layers.0.self_attn`).

    Every parameter must be present with its exact shape and nothing may be left over; errors name
    the tensors. Values are cast to each parameter's dtype.
    """
    expected = {f"{name}.{pname}": param for name, layer in layers.items()
                for pname, param in layer.named_parameters(recurse=False)}
    missing = sorted(set(expected) - set(adapter.tensors))
    unexpected = sorted(set(adapter.tensors) - set(expected))
    if missing or unexpected:
        hint = ""
        if missing and unexpected:
            hint = " (module paths differ: adapter built for another backbone or layer layout?)"
        raise AdapterError(f"adapter does not match the backbone{hint}: missing {missing[:4]}"
                           f"{'…' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                           f"{'…' if len(unexpected) > 4 else ''}")
    with torch.no_grad():
        for key, param in expected.items():
            value = adapter.tensors[key]
            if tuple(value.shape) != tuple(param.shape):
                raise AdapterError(f"{key}: shape {tuple(value.shape)} does not match the backbone's "
                                   f"{tuple(param.shape)} (config/backbone mismatch)")
            param.copy_(value.to(param.dtype))


def _load_reference_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads other than tensors are refused here
        raise AdapterError(f"{path}: not a tensors-only adapter file ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in data.items()):
        raise AdapterError(f"{path}: expected a flat dict of name → tensor")
    return data


def save_adapter(adapter: Adapter, directory: str | Path, *, formats: tuple[str, ...] = ("safetensors",)) -> Path:
    """Write the config and the weights in the requested forms ("safetensors" and/or "pt")."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    adapter.config.save(root)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.tensors.items()}
    for fmt in formats:
        if fmt == "safetensors":
            save_file(tensors, str(root / SAFETENSORS_WEIGHTS_FILE), metadata={"format": "delta-mem"})
        elif fmt == "pt":
            torch.save(tensors, str(root / REFERENCE_WEIGHTS_FILE))
        else:
            raise ValueError(f"unknown adapter format {fmt!r}")
    return root
