"""The frozen prefix: the residual stream entering the first memory layer, computed once per view.

A memory that lives only in the top layers of a frozen backbone leaves every layer below it unchanged,
so what enters its first layer is the same in every epoch. Computing it once and training only the
top (`DeltaMemModel.forward_from`) makes an episode cost only the top layers and the head: for a
layer-29 memory on SmolLM2 (30 layers) that is one decoder layer of thirty. The cache is kept on the training device
and saved in the run directory, keyed by the tokens, the model and the layer, so a resumed run
does not pay for it again.
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


def _key(dm: DeltaMemModel, episodes: Sequence[Episode], layer: int) -> str:
    h = hashlib.sha256(f"{getattr(dm.model.config, '_name_or_path', '')}|{layer}|{dm.device}".encode())
    for p in list(dm.model.parameters())[:2]:
        h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    for ep in episodes:
        h.update(repr((ep.write_ids, ep.read_ids)).encode())
    return h.hexdigest()[:24]


def build_prefix(dm: DeltaMemModel, episodes: Sequence[Episode], layer: int, path: Path | None = None,
                 desc: str = "frozen prefix", progress_bar: bool = True) -> list[Views]:
    """Each episode's views as the residual stream entering decoder `layer` (loaded from `path` when
    it holds the same episodes, model and layer; written there otherwise)."""
    from tqdm import tqdm

    key = _key(dm, episodes, layer)
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True, map_location=dm.device)
        if saved.get("key") == key:
            log.info("%s: %d conversations loaded from %s", desc, len(episodes), path)
            return list(zip(saved["write"], saved["read"]))
    t0, tokens = time.perf_counter(), 0
    views: list[Views] = []
    bar = tqdm(episodes, desc=f"{desc} (layers 0-{layer - 1})", unit="conv", disable=not progress_bar,
               mininterval=2)
    empty = torch.zeros(0, dm.model.config.hidden_size, device=dm.device)
    for ep in bar:
        w = dm.hidden_states_before(torch.tensor([ep.write_ids], device=dm.device), layer)[0] if ep.write_ids else empty
        r = dm.hidden_states_before(torch.tensor([ep.read_ids], device=dm.device), layer)[0]
        views.append((w, r))
        tokens += ep.tokens
        bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    log.info("%s: %d conversations, %d tokens through layers 0-%d in %.0f s", desc, len(episodes), tokens,
             layer - 1, time.perf_counter() - t0)
    if path is not None:
        tmp = path.with_name(f".{path.name}.partial")
        torch.save({"key": key, "write": [w for w, _ in views], "read": [r for _, r in views]}, tmp)
        tmp.replace(path)
    return views
