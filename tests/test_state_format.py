"""The session-state format: exact round trips, and every corruption is a clear, typed error."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path

import pytest
import torch

from delta_mem_vllm.state import keys as keys_mod
from delta_mem_vllm.state.format import (
    FORMAT_VERSION,
    Snapshot,
    StateFormatError,
    StateMismatchError,
    decode_snapshot,
    encode_snapshot,
    export_document,
    import_document,
    manifest_checksum,
)
from delta_mem_vllm.state.keys import storage_key, validate_session_id, validate_storage_key


def make_snapshot(layers: int = 3, h: int = 1, r: int = 8, seed: int = 0, fp: str = "adapter-fp") -> Snapshot:
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(layers, h, r, r, generator=g, dtype=torch.float32)
    state[0, 0, 0, 0] = -0.0  # signed zero must survive bit-exactly
    state[-1, -1, -1, -1] = 1e-38  # denormal-ish value too
    return Snapshot(
        state=state,
        record={"id": "s1", "owner": None, "version": 7, "messages": ["ab12", "cd34"], "pending": [1, 2, 3]},
        adapter_fingerprint=fp,
        layer_names=[f"model.layers.{i}.self_attn" for i in range(layers)],
        model_fingerprint="model-fp",
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("h", [1, 4])
def test_round_trip_bit_exact(h: int) -> None:
    s = make_snapshot(layers=5, h=h)
    data, manifest = encode_snapshot(s)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["shape"] == [5, h, 8, 8]
    assert manifest["dtype"] == "float32"
    assert manifest["layer_names"] == s.layer_names
    assert manifest["adapter_fingerprint"] == "adapter-fp" and manifest["model_fingerprint"] == "model-fp"
    assert isinstance(manifest["created_at"], float) and isinstance(manifest["updated_at"], float)
    json.dumps(manifest, allow_nan=False)  # JSON-able as is
    out = decode_snapshot(data, manifest, expect_adapter_fingerprint="adapter-fp", expect_shape=(5, h, 8, 8),
                          expect_layer_names=s.layer_names)
    assert out.state.dtype == torch.float32 and out.state.shape == s.state.shape
    assert torch.equal(bits(out.state), bits(s.state))
    assert out.record == s.record and out.layer_names == s.layer_names
    assert out.adapter_fingerprint == s.adapter_fingerprint and out.model_fingerprint == s.model_fingerprint


def test_one_tensor_per_layer_inside_safetensors() -> None:
    from safetensors.torch import load

    s = make_snapshot(layers=3, h=2)
    data, _ = encode_snapshot(s)
    tensors = load(data)
    assert sorted(tensors) == sorted(s.layer_names)
    for i, name in enumerate(s.layer_names):
        assert tensors[name].shape == (2, 8, 8) and torch.equal(tensors[name], s.state[i])


def test_per_layer_expect_shape_and_wildcards() -> None:
    s = make_snapshot(layers=2, h=4)
    data, manifest = encode_snapshot(s)
    decode_snapshot(data, manifest, expect_shape=(4, 8, 8))
    decode_snapshot(data, manifest, expect_shape=(None, 4, 8, 8))
    with pytest.raises(StateMismatchError, match=r"shape \[2, 4, 8, 8\].*\[1, 8, 8\]"):
        decode_snapshot(data, manifest, expect_shape=(1, 8, 8))


def test_wrong_fingerprint_names_both() -> None:
    data, manifest = encode_snapshot(make_snapshot(fp="fp-A"))
    with pytest.raises(StateMismatchError) as ei:
        decode_snapshot(data, manifest, expect_adapter_fingerprint="fp-B")
    assert "fp-A" in str(ei.value) and "fp-B" in str(ei.value)
    assert isinstance(ei.value, StateFormatError)  # subclass: a catch-all for format errors still works


def test_wrong_layer_names_is_mismatch() -> None:
    s = make_snapshot(layers=2)
    data, manifest = encode_snapshot(s)
    with pytest.raises(StateMismatchError, match="layer"):
        decode_snapshot(data, manifest, expect_layer_names=["a", "b"])
    with pytest.raises(StateMismatchError, match="order"):
        decode_snapshot(data, manifest, expect_layer_names=list(reversed(s.layer_names)))


def test_data_checksum_corruption() -> None:
    data, manifest = encode_snapshot(make_snapshot())
    bad = bytearray(data)
    bad[-5] ^= 0x01
    with pytest.raises(StateFormatError, match="checksum"):
        decode_snapshot(bytes(bad), manifest)


def test_truncated_data() -> None:
    data, manifest = encode_snapshot(make_snapshot())
    for cut in (0, 7, len(data) // 2, len(data) - 1):
        with pytest.raises(StateFormatError, match="truncated"):
            decode_snapshot(data[:cut], manifest)


@pytest.mark.parametrize(
    "field,value",
    [
        ("shape", [3, 1, 4, 4]),
        ("shape", [3, 2, 8, 8]),
        ("dtype", "float16"),
        ("adapter_fingerprint", "other"),
        ("layer_names", ["x", "y", "z"]),
        ("sha256", "0" * 64),
        ("nbytes", 12),
        ("record", {"id": "s2", "version": 8}),
    ],
)
def test_flipped_manifest_fields_detected(field: str, value: object) -> None:
    data, manifest = encode_snapshot(make_snapshot())
    m = copy.deepcopy(manifest)
    m[field] = value
    with pytest.raises(StateFormatError, match="manifest checksum"):
        decode_snapshot(data, m)


def test_manifest_structure_errors() -> None:
    data, manifest = encode_snapshot(make_snapshot())
    with pytest.raises(StateFormatError, match="format_version"):
        decode_snapshot(data, {**manifest, "format_version": 2})
    missing = dict(manifest)
    del missing["sha256"]
    with pytest.raises(StateFormatError, match="missing field.*sha256"):
        decode_snapshot(data, missing)
    with pytest.raises(StateFormatError, match="JSON object"):
        decode_snapshot(data, "not a dict")  # type: ignore[arg-type]


def resign(manifest: dict) -> dict:
    """A manifest edited by someone who also recomputed the manifest checksum (a crafted file)."""
    m = dict(manifest)
    m["manifest_sha256"] = manifest_checksum(m)
    return m


def test_crafted_manifest_with_valid_checksums_still_checked() -> None:
    data, manifest = encode_snapshot(make_snapshot(layers=3, h=1))
    with pytest.raises(StateFormatError, match=r"tensor .* has shape \[1, 8, 8\], expected \[2, 8, 8\]"):
        decode_snapshot(data, resign({**manifest, "shape": [3, 2, 8, 8]}))
    with pytest.raises(StateFormatError, match="dtype"):
        decode_snapshot(data, resign({**manifest, "dtype": "bfloat16"}))
    with pytest.raises(StateFormatError, match="do not match the manifest's layer names"):
        decode_snapshot(data, resign({**manifest, "layer_names": ["a", "b", "c"]}))
    with pytest.raises(StateFormatError, match="invalid shape"):
        decode_snapshot(data, resign({**manifest, "shape": [3, 1, 8, 4]}))


def test_wrong_dtype_tensor_in_data() -> None:
    from safetensors.torch import save

    s = make_snapshot(layers=2)
    data, manifest = encode_snapshot(s)
    bad = save({n: s.state[i].clone().double() for i, n in enumerate(s.layer_names)})
    import hashlib

    m = resign({**manifest, "sha256": hashlib.sha256(bad).hexdigest(), "nbytes": len(bad)})
    with pytest.raises(StateFormatError, match="dtype torch.float64"):
        decode_snapshot(bad, m)


def test_not_safetensors_bytes() -> None:
    import hashlib

    data, manifest = encode_snapshot(make_snapshot())
    junk = b"\xff" * len(data)
    m = resign({**manifest, "sha256": hashlib.sha256(junk).hexdigest()})
    with pytest.raises(StateFormatError, match="not valid safetensors"):
        decode_snapshot(junk, m)


def test_non_finite_state_refused_both_ways() -> None:
    s = make_snapshot()
    s.state[1, 0, 2, 3] = float("nan")
    with pytest.raises(StateFormatError, match="NaN"):
        encode_snapshot(s)
    # a crafted file with NaN inside is refused on load, too
    import hashlib

    from safetensors.torch import save

    good = make_snapshot()
    data, manifest = encode_snapshot(good)
    bad_state = good.state.clone()
    bad_state[0, 0, 0, 0] = float("inf")
    bad = save({n: bad_state[i].clone() for i, n in enumerate(good.layer_names)})
    m = resign({**manifest, "sha256": hashlib.sha256(bad).hexdigest(), "nbytes": len(bad)})
    with pytest.raises(StateFormatError, match="NaN or Inf"):
        decode_snapshot(bad, m)


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (lambda s: setattr(s, "state", s.state.double()), "float32"),
        (lambda s: setattr(s, "state", s.state[0]), r"\[L, h, R, R\]"),
        (lambda s: setattr(s, "state", s.state[..., :4]), "square"),
        (lambda s: setattr(s, "layer_names", s.layer_names[:-1]), "layer names for"),
        (lambda s: setattr(s, "layer_names", ["a", "a", "b"]), "duplicates"),
        (lambda s: setattr(s, "record", {"x": object()}), "JSON"),
        (lambda s: setattr(s, "record", {"x": float("nan")}), "JSON"),
    ],
)
def test_encode_refuses_invalid_snapshots(mutate, pattern: str) -> None:
    s = make_snapshot()
    mutate(s)
    with pytest.raises(StateFormatError, match=pattern):
        encode_snapshot(s)


def test_export_import_document_round_trip() -> None:
    s = make_snapshot(layers=4, h=4)
    doc = export_document(s)
    assert doc["format_version"] == FORMAT_VERSION and set(doc) >= {"format_version", "manifest", "data"}
    text = json.dumps(doc)  # what goes over HTTP
    out = import_document(json.loads(text), expect_adapter_fingerprint="adapter-fp", expect_shape=(4, 8, 8))
    assert torch.equal(bits(out.state), bits(s.state)) and out.record == s.record
    with pytest.raises(StateMismatchError, match="adapter-fp.*other"):
        import_document(json.loads(text), expect_adapter_fingerprint="other")


def test_import_document_errors() -> None:
    doc = export_document(make_snapshot())
    with pytest.raises(StateFormatError, match="base64"):
        import_document({**doc, "data": "!!!not base64!!!"})
    with pytest.raises(StateFormatError, match="base64"):
        import_document({**doc, "data": 123})
    with pytest.raises(StateFormatError, match="format_version"):
        import_document({**doc, "format_version": 99})
    with pytest.raises(StateFormatError, match="manifest"):
        import_document({"format_version": FORMAT_VERSION, "data": doc["data"]})
    with pytest.raises(StateFormatError, match="JSON object"):
        import_document([doc])
    raw = base64.b64decode(doc["data"])
    with pytest.raises(StateFormatError, match="truncated"):
        import_document({**doc, "data": base64.b64encode(raw[:-10]).decode()})


def test_non_contiguous_state_encodes() -> None:
    s = make_snapshot()
    s.state = s.state.transpose(2, 3).contiguous().transpose(2, 3)  # a non-contiguous view
    assert not s.state.is_contiguous()
    data, manifest = encode_snapshot(s)
    assert torch.equal(decode_snapshot(data, manifest).state, s.state)


def test_no_pickle_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ast
    import pickle

    pkg = Path(keys_mod.__file__).parent
    for path in pkg.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                assert not any(m.split(".")[0] in {"pickle", "dill", "marshal", "shelve", "cloudpickle"} for m in mods), path
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
                assert node.attr not in {"load", "save"}, f"{path}: torch.{node.attr}"

    # and at run time: a full round trip through every local backend never touches pickle/torch.load
    def boom(*a, **k):
        raise AssertionError("pickle/torch.load used")

    for name in ("load", "loads", "dump", "dumps", "Unpickler", "Pickler"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(torch, "save", boom)
    from delta_mem_vllm.state import FilesystemBackend, MemoryBackend, TieredStateStore

    s = make_snapshot()
    import_document(export_document(s))
    for backend in (MemoryBackend(), FilesystemBackend(tmp_path / "fs")):
        store = TieredStateStore(backend, device_capacity=1, host_capacity=1)
        for i in range(3):
            store.put(storage_key(None, f"s{i}"), s)
        assert torch.equal(store.get(storage_key(None, "s0")).state, s.state)


# --------------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------------


def test_session_id_validation() -> None:
    for ok in ("a", "A-b_c.d:e", "x" * 128, "chat:2024-01-01.1"):
        assert validate_session_id(ok) == ok
    for bad in ("", "x" * 129, "a b", "../../etc/passwd", "a/b", "abc\n", "é", None, 5):
        with pytest.raises(ValueError, match="invalid session id"):
            validate_session_id(bad)


def test_storage_key_hashing() -> None:
    k = storage_key(None, "s1")
    assert re.fullmatch(r"[0-9a-f]{64}", k) and validate_storage_key(k) == k
    assert storage_key(None, "s1") == k  # deterministic
    assert storage_key("", "s1") != k and storage_key("null", "s1") != k  # unambiguous owner encoding
    assert storage_key("key-a", "s1") != storage_key("key-b", "s1")
    assert storage_key("a:b", "c") != storage_key("a", "b:c")
    with pytest.raises(ValueError):
        storage_key(None, "../../etc/passwd")
    with pytest.raises(ValueError, match="storage key"):
        validate_storage_key("s1")
    with pytest.raises(ValueError, match="storage key"):
        validate_storage_key("../" + "a" * 61)


def test_the_same_snapshot_always_encodes_to_the_same_bytes() -> None:
    """Export is deterministic: no clock in the manifest, no map order in the safetensors header."""
    from delta_mem_vllm.state.format import encode_snapshot

    snap = make_snapshot(layers=4)
    snap.record["last_used_at"] = 1234.5
    first = encode_snapshot(snap)
    for _ in range(20):
        assert encode_snapshot(snap) == first
    assert first[1]["updated_at"] == 1234.5
    assert decode_snapshot(*first).state.equal(snap.state)
