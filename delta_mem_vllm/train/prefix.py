"""The frozen prefix: the residual stream entering the first memory layer, computed once per view.

A memory that lives only in the top layers of a frozen backbone leaves every layer below it unchanged,
so what enters its first layer is the same in every epoch. Computing it once and training only the
top (`DeltaMemModel.forward_from`) makes an episode cost only the top layers and the head: for a
layer-29 memory on SmolLM2 (30 layers) that is one decoder layer of thirty. The cache is kept on the training device
and saved in the run directory, keyed per conversation by its tokens, the model and the layer, so a
resumed run does not pay for it again, and a run given more data computes only what is new.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from ..hf.model import DeltaMemModel
from .episodes import Episode

log = logging.getLogger(__name__)
Views = tuple[torch.Tensor, torch.Tensor]      # (write view [Tw, H], read view [Tr, H]); Tw may be 0


def _model_hash(dm: DeltaMemModel, layer: int) -> "hashlib._Hash":
    h = hashlib.sha256(f"{getattr(dm.model.config, '_name_or_path', '')}|{layer}|{dm.device}".encode())
    for p in list(dm.model.parameters())[:2]:
        h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h


def _key(dm: DeltaMemModel, episodes: Sequence[Episode], layer: int) -> str:
    """One key for the model, the layer and these episodes in order (the first cache format)."""
    h = _model_hash(dm, layer)
    for ep in episodes:
        h.update(repr((ep.write_ids, ep.read_ids)).encode())
    return h.hexdigest()[:24]


def _episode_keys(dm: DeltaMemModel, episodes: Sequence[Episode], layer: int) -> list[str]:
    """A key per episode (model, layer, tokens), so a cache serves any data set that shares episodes."""
    base = _model_hash(dm, layer)
    keys = []
    for ep in episodes:
        h = base.copy()
        h.update(repr((ep.write_ids, ep.read_ids)).encode())
        keys.append(h.hexdigest()[:24])
    return keys


def _load(path: Path, dm: DeltaMemModel, episodes: Sequence[Episode], layer: int,
          keys: list[str]) -> dict[str, Views]:
    """The cached views in `path` by episode key; a cache of the first format is used when it holds
    a leading run of these episodes (more data appended to the same run)."""
    saved = torch.load(path, weights_only=True, map_location=dm.device)
    views = list(zip(saved["write"], saved["read"]))
    if "episodes" in saved:
        return dict(zip(saved["episodes"], views))
    n = len(views)
    return dict(zip(keys[:n], views)) if n <= len(episodes) and saved.get("key") == _key(dm, episodes[:n], layer) \
        else {}


def build_prefix(dm: DeltaMemModel, episodes: Sequence[Episode], layer: int, path: Path | None = None,
                 desc: str = "frozen prefix", progress_bar: bool = True) -> list[Views]:
    """Each episode's views as the residual stream entering decoder `layer`: those already in the
    cache at `path` (same model, layer and tokens) loaded, the rest computed, and the whole set
    written back there."""
    from tqdm import tqdm

    keys = _episode_keys(dm, episodes, layer)
    cached = _load(path, dm, episodes, layer, keys) if path is not None and path.exists() else {}
    todo = [i for i, k in enumerate(keys) if k not in cached]
    if len(todo) < len(episodes):
        log.info("%s: %d of %d conversations loaded from %s", desc, len(episodes) - len(todo), len(episodes), path)
    if not todo:
        return [cached[k] for k in keys]
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(todo, desc=f"{desc} (layers 0-{layer - 1})", unit="conv", disable=not progress_bar, mininterval=2)
    empty = torch.zeros(0, dm.model.config.hidden_size, device=dm.device)
    for i in bar:
        ep = episodes[i]
        w = dm.hidden_states_before(torch.tensor([ep.write_ids], device=dm.device), layer)[0] if ep.write_ids else empty
        r = dm.hidden_states_before(torch.tensor([ep.read_ids], device=dm.device), layer)[0]
        cached[keys[i]] = (w, r)
        tokens += ep.tokens
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}", refresh=False)
    log.info("%s: %d conversations, %d tokens through layers 0-%d in %.0f s", desc, len(todo), tokens,
             layer - 1, time.perf_counter() - t0)
    views = [cached[k] for k in keys]
    if path is not None:
        tmp = path.with_name(f".{path.name}.partial")
        torch.save({"episodes": keys, "write": [w for w, _ in views], "read": [r for _, r in views]}, tmp)
        tmp.replace(path)
    return views
