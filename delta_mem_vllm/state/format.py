"""The session-state persistence format: safetensors for the tensors + a JSON manifest.

Why this shape:
- safetensors holds one fp32 tensor per Δ-Mem layer (key = layer name, shape [h, r, r]); it is a
  plain header + raw bytes, so loading never executes code (no pickle, no ``torch.load``).
- The manifest names what the bytes are (format version, model/adapter fingerprint, layer order,
  shape, dtype) and carries two SHA-256 checksums: ``sha256`` over the safetensors bytes and
  ``manifest_sha256`` over the manifest itself (canonical JSON, without that field), so a flipped
  byte anywhere — tensor data, shape, fingerprint, or the server's session record — is detected
  instead of silently producing a wrong memory.
- Integrity problems raise :class:`StateFormatError`; a *valid* state that belongs to another adapter
  or another layer layout raises :class:`StateMismatchError` (the HTTP layer maps it to 409). A state
  of the wrong shape is always an error, never zero-filled.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

FORMAT_VERSION = 1
DTYPE = "float32"
_MANIFEST_CHECKSUM_FIELD = "manifest_sha256"
_REQUIRED_FIELDS = (
    "format_version",
    "adapter_fingerprint",
    "model_fingerprint",
    "layer_names",
    "shape",
    "dtype",
    "sha256",
    "nbytes",
    "created_at",
    "updated_at",
    "record",
    _MANIFEST_CHECKSUM_FIELD,
)

__all__ = [
    "DTYPE",
    "FORMAT_VERSION",
    "Snapshot",
    "StateFormatError",
    "StateMismatchError",
    "check_expectations",
    "decode_snapshot",
    "encode_snapshot",
    "export_document",
    "import_document",
    "manifest_checksum",
    "validate_manifest",
    "validate_snapshot",
]


class StateFormatError(ValueError):
    """A stored or imported state is corrupted, truncated, malformed or of an unsupported version."""


class StateMismatchError(StateFormatError):
    """A well-formed state that belongs to another adapter (fingerprint) or another layer layout."""


@dataclass
class Snapshot:
    """One session's committed state: the stacked per-layer tensors plus the server's record.

    ``state`` is ``[L, h, R, R]`` float32 (CPU or device); ``layer_names[i]`` names ``state[i]``.
    ``record`` is JSON-able and owned by the server (ids, version, counters, message-log hashes,
    pending tokens, timestamps…); this package stores it verbatim and never interprets it.
    """

    state: torch.Tensor
    record: dict[str, Any]
    adapter_fingerprint: str
    layer_names: list[str]
    model_fingerprint: str = ""
    # Not part of the stored identity; filled by decode for information (e.g. GET /sessions/{id}).
    created_at: float | None = field(default=None, compare=False)
    updated_at: float | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        return int(self.state.numel() * self.state.element_size())

    def copy(self, device: str | torch.device | None = None) -> "Snapshot":
        """A deep copy (state cloned, optionally onto ``device``; record deep-copied).

        The store hands out copies so that an engine writing into its initial state in place can
        never corrupt the committed one (a failed turn must commit nothing).
        """
        target = self.state.device if device is None else torch.device(device)
        state = self.state.detach().to(target, copy=True)
        return Snapshot(
            state=state,
            record=copy.deepcopy(self.record),
            adapter_fingerprint=self.adapter_fingerprint,
            layer_names=list(self.layer_names),
            model_fingerprint=self.model_fingerprint,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``manifest`` without its own checksum field."""
    body = {k: v for k, v in manifest.items() if k != _MANIFEST_CHECKSUM_FIELD}
    return hashlib.sha256(_canonical_json(body)).hexdigest()


def _shape_str(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def validate_snapshot(s: Snapshot) -> None:
    """Check a snapshot before it is stored: fp32, 4-D, one name per layer, finite, JSON-able record.

    A NaN/Inf state is refused so that a numerically broken turn can never become the committed
    memory of a session (the caller should fail the turn instead).
    """
    if not isinstance(s, Snapshot):
        raise StateFormatError(f"expected a Snapshot, got {type(s).__name__}")
    t = s.state
    if not isinstance(t, torch.Tensor):
        raise StateFormatError(f"Snapshot.state must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise StateFormatError(f"Snapshot.state must be float32, got {t.dtype}")
    if t.dim() != 4 or any(d <= 0 for d in t.shape):
        raise StateFormatError(f"Snapshot.state must have shape [L, h, R, R] with L, h, R >= 1, got {_shape_str(t.shape)}")
    if t.shape[2] != t.shape[3]:
        raise StateFormatError(f"Snapshot.state must be square in its last two dims, got {_shape_str(t.shape)}")
    names = s.layer_names
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise StateFormatError("Snapshot.layer_names must be a list of non-empty strings")
    if len(names) != t.shape[0]:
        raise StateFormatError(f"Snapshot has {len(names)} layer names for {t.shape[0]} state layers")
    if len(set(names)) != len(names):
        raise StateFormatError("Snapshot.layer_names contains duplicates")
    if any(n.startswith("__") for n in names):
        raise StateFormatError("layer names must not start with '__' (reserved by safetensors)")
    if not isinstance(s.adapter_fingerprint, str) or not isinstance(s.model_fingerprint, str):
        raise StateFormatError("adapter_fingerprint and model_fingerprint must be strings")
    if not isinstance(s.record, dict):
        raise StateFormatError(f"Snapshot.record must be a dict, got {type(s.record).__name__}")
    try:
        _canonical_json(s.record)
    except (TypeError, ValueError) as exc:
        raise StateFormatError(f"Snapshot.record is not JSON-serialisable: {exc}") from exc
    if not bool(torch.isfinite(t).all()):
        raise StateFormatError("Snapshot.state contains NaN or Inf; refusing to store a non-finite state")


def _timestamp(record: dict[str, Any], now: float, keys: tuple[str, ...] = ("created_at", "created")) -> float:
    for key in keys:
        v = record.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return now


def _canonical(data: bytes) -> bytes:
    """safetensors bytes with the JSON header's keys sorted: the library writes its metadata map in
    a per-process random order, and the same state must always give the same bytes."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)   # the format aligns the tensor data to 8 bytes
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


def encode_snapshot(s: Snapshot) -> tuple[bytes, dict[str, Any]]:
    """Serialise ``s`` to (safetensors bytes, manifest dict). The state may live on any device."""
    validate_snapshot(s)
    cpu = s.state.detach().to("cpu")
    # One tensor per layer (clone: safetensors refuses views that share one storage).
    tensors = {name: cpu[i].clone().contiguous() for i, name in enumerate(s.layer_names)}
    data = _canonical(_st_save(tensors, metadata={"format": "delta-mem-state", "format_version": str(FORMAT_VERSION)}))
    # times from the snapshot, not the clock where it has them: the same snapshot, the same bytes
    updated = s.updated_at if s.updated_at is not None else _timestamp(s.record, time.time(),
                                                                       ("last_used_at", "updated_at"))
    created = s.created_at if s.created_at is not None else _timestamp(s.record, updated)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "adapter_fingerprint": s.adapter_fingerprint,
        "model_fingerprint": s.model_fingerprint,
        "layer_names": list(s.layer_names),
        "shape": [int(d) for d in s.state.shape],
        "dtype": DTYPE,
        "sha256": hashlib.sha256(data).hexdigest(),
        "nbytes": len(data),
        "created_at": created,
        "updated_at": updated,
        "record": copy.deepcopy(s.record),
    }
    manifest[_MANIFEST_CHECKSUM_FIELD] = manifest_checksum(manifest)
    return data, manifest


def validate_manifest(manifest: Any) -> dict[str, Any]:
    """Check the manifest's structure, version and self-checksum (not the tensor bytes)."""
    if not isinstance(manifest, dict):
        raise StateFormatError(f"state manifest must be a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StateFormatError(f"unsupported state format_version {version!r} (this build reads {FORMAT_VERSION})")
    missing = [k for k in _REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise StateFormatError(f"state manifest is missing field(s): {', '.join(missing)}")
    try:
        actual = manifest_checksum(manifest)
    except (TypeError, ValueError) as exc:
        raise StateFormatError(f"state manifest is not canonical JSON: {exc}") from exc
    if manifest[_MANIFEST_CHECKSUM_FIELD] != actual:
        raise StateFormatError(
            f"state manifest checksum mismatch (stored {manifest[_MANIFEST_CHECKSUM_FIELD]!r}, computed {actual!r}): "
            "the manifest was modified or corrupted"
        )
    shape = manifest["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        or shape[2] != shape[3]
    ):
        raise StateFormatError(f"state manifest has an invalid shape {shape!r}; expected [L, h, R, R]")
    if manifest["dtype"] != DTYPE:
        raise StateFormatError(f"state dtype {manifest['dtype']!r} is not supported; expected {DTYPE!r}")
    names = manifest["layer_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise StateFormatError("state manifest layer_names must be a list of unique non-empty strings")
    if len(names) != shape[0]:
        raise StateFormatError(f"state manifest lists {len(names)} layer names for shape {_shape_str(shape)}")
    for k in ("adapter_fingerprint", "model_fingerprint", "sha256"):
        if not isinstance(manifest[k], str):
            raise StateFormatError(f"state manifest field {k!r} must be a string")
    if not isinstance(manifest["record"], dict):
        raise StateFormatError("state manifest field 'record' must be an object")
    return manifest


def _shape_matches(actual: tuple[int, ...], expect: tuple[Any, ...]) -> bool:
    if len(expect) == 3:  # per-layer [h, R, R]
        actual = actual[1:]
    if len(expect) != len(actual):
        return False
    return all(e is None or int(e) == a for e, a in zip(expect, actual))


def check_expectations(
    *,
    adapter_fingerprint: str,
    shape: tuple[int, ...],
    layer_names: list[str],
    expect_adapter_fingerprint: str | None = None,
    expect_shape: tuple | None = None,
    expect_layer_names: list[str] | None = None,
) -> None:
    """Raise :class:`StateMismatchError` when a valid state does not fit the loaded adapter.

    ``expect_shape`` is either the full ``(L, h, R, R)`` or the per-layer ``(h, R, R)``; ``None``
    entries are wildcards.
    """
    if expect_adapter_fingerprint is not None and adapter_fingerprint != expect_adapter_fingerprint:
        raise StateMismatchError(
            f"state belongs to adapter fingerprint {adapter_fingerprint!r}, "
            f"but the loaded adapter's fingerprint is {expect_adapter_fingerprint!r}"
        )
    if expect_shape is not None:
        exp = tuple(expect_shape)
        if len(exp) not in (3, 4) or not _shape_matches(tuple(shape), exp):
            raise StateMismatchError(
                f"state has shape {_shape_str(shape)}, the loaded adapter expects "
                f"{_shape_str(('*' if d is None else d) for d in exp)}"
            )
    if expect_layer_names is not None and list(layer_names) != list(expect_layer_names):
        diff = sorted(set(layer_names) ^ set(expect_layer_names))[:4]
        raise StateMismatchError(
            f"state covers {len(layer_names)} layer(s) that differ from the loaded adapter's "
            f"{len(expect_layer_names)} layer(s)" + (f" (e.g. {diff})" if diff else " (same names, different order)")
        )


def decode_snapshot(
    data: bytes,
    manifest: dict[str, Any],
    *,
    expect_adapter_fingerprint: str | None = None,
    expect_shape: tuple | None = None,
    expect_layer_names: list[str] | None = None,
) -> Snapshot:
    """Verify and load (safetensors bytes, manifest) into a CPU :class:`Snapshot`.

    Integrity is checked first (manifest checksum, data checksum, tensor keys/shapes/dtype, finite
    values → :class:`StateFormatError`), then the expectations (→ :class:`StateMismatchError`).
    """
    manifest = validate_manifest(manifest)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateFormatError(f"state data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) != manifest["nbytes"]:
        raise StateFormatError(
            f"state data is {len(data)} bytes but the manifest says {manifest['nbytes']} (truncated or padded)"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != manifest["sha256"]:
        raise StateFormatError(f"state data checksum mismatch (manifest {manifest['sha256']}, data {digest})")
    try:
        tensors = _st_load(data)
    except Exception as exc:  # noqa: BLE001 - any parse failure (SafetensorError, OSError...) is a format error
        raise StateFormatError(f"state data is not valid safetensors: {exc}") from exc
    names: list[str] = manifest["layer_names"]
    shape: list[int] = manifest["shape"]
    if set(tensors) != set(names):
        extra = sorted(set(tensors) - set(names))[:4]
        missing = sorted(set(names) - set(tensors))[:4]
        raise StateFormatError(f"state tensors do not match the manifest's layer names (missing {missing}, extra {extra})")
    per_layer = tuple(shape[1:])
    for name in names:
        t = tensors[name]
        if t.dtype != torch.float32:
            raise StateFormatError(f"state tensor {name!r} has dtype {t.dtype}, expected float32")
        if tuple(t.shape) != per_layer:
            raise StateFormatError(f"state tensor {name!r} has shape {_shape_str(t.shape)}, expected {_shape_str(per_layer)}")
    state = torch.stack([tensors[n] for n in names]).contiguous()
    if not bool(torch.isfinite(state).all()):
        raise StateFormatError("state contains NaN or Inf values")
    check_expectations(
        adapter_fingerprint=manifest["adapter_fingerprint"],
        shape=tuple(shape),
        layer_names=names,
        expect_adapter_fingerprint=expect_adapter_fingerprint,
        expect_shape=expect_shape,
        expect_layer_names=expect_layer_names,
    )
    created = manifest.get("created_at")
    updated = manifest.get("updated_at")
    return Snapshot(
        state=state,
        record=copy.deepcopy(manifest["record"]),
        adapter_fingerprint=manifest["adapter_fingerprint"],
        layer_names=list(names),
        model_fingerprint=manifest["model_fingerprint"],
        created_at=float(created) if isinstance(created, (int, float)) else None,
        updated_at=float(updated) if isinstance(updated, (int, float)) else None,
    )


def export_document(s: Snapshot) -> dict[str, Any]:
    """One JSON-able document for ``GET /v1/sessions/{id}/state``: manifest + base64 safetensors."""
    data, manifest = encode_snapshot(s)
    return {
        "object": "session.state",
        "format_version": FORMAT_VERSION,
        "manifest": manifest,
        "data": base64.b64encode(data).decode("ascii"),
    }


def import_document(doc: Any, **expect: Any) -> Snapshot:
    """Inverse of :func:`export_document`; ``expect`` = the ``expect_*`` keywords of decode_snapshot."""
    if not isinstance(doc, dict):
        raise StateFormatError(f"state document must be a JSON object, got {type(doc).__name__}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise StateFormatError(
            f"unsupported state document format_version {doc.get('format_version')!r} (this build reads {FORMAT_VERSION})"
        )
    if "manifest" not in doc or "data" not in doc:
        raise StateFormatError("state document needs 'manifest' and 'data'")
    raw = doc["data"]
    if not isinstance(raw, str):
        raise StateFormatError("state document 'data' must be a base64 string")
    try:
        data = base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise StateFormatError(f"state document 'data' is not valid base64: {exc}") from exc
    return decode_snapshot(data, doc["manifest"], **expect)
