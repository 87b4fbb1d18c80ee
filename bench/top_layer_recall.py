"""Train a Δ-Mem memory in the top layers only, on cached outputs of the frozen layers below.

    python bench/top_layer_recall.py --model DIR --train data/closed/train.jsonl \
        --heldout data/closed/heldout.jsonl --layers 29 --alpha 8192 [--epochs 3] [--out DIR]

An experiment tool, not the trainer: it exists because the trainer pays the whole backbone (about
5 s per episode on the 2-core CPU) while a memory in layers ≥ L only needs the frozen, memory-free
layers below L once per conversation. Their output at `--cache-at` is computed once (and saved with
`--cache-file`), so each training episode runs only the top layers (about 0.3 s from layer 24).
Same episode construction, decorrelated init, loss (answer cross-entropy, no gate regulariser),
AdamW and clipping as `delta-mem-vllm train`; the data is passed over in a fresh shuffled order each
epoch and held-out exact answers (every answer token the top choice) are printed after each epoch.
`message_mean` segment ids split at `<|im_start|>` (ChatML templates only).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from delta_mem_vllm.adapter import save_adapter  # noqa: E402
from delta_mem_vllm.config import DeltaMemConfig  # noqa: E402
from delta_mem_vllm.hf.model import DeltaMemModel, _Call  # noqa: E402
from delta_mem_vllm.train.episodes import IGNORE, Episode, build_episode  # noqa: E402
from delta_mem_vllm.train.trainer import decorrelate_memory_projections  # noqa: E402


class TopLayers:
    """Runs the decoder from layer `first` on given hidden states, with the memory's hooks live."""

    def __init__(self, dm: DeltaMemModel, first: int, segment_start: int) -> None:
        self.dm, self.inner = dm, dm.model.model
        self.full = self.inner.layers
        self.top = nn.ModuleList(list(self.full)[first:])
        self.first, self.segment_start = first, segment_start

    @torch.no_grad()
    def frozen_input(self, ids: list[int]) -> torch.Tensor:
        """The residual stream entering layer `first` ([T, H]); exact while no memory sits below it."""
        return self.inner(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[self.first][0].clone()

    def __call__(self, h: torch.Tensor, state: torch.Tensor, write: bool, logits_to_keep: int,
                 ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        T = h.shape[0]
        segments = None
        if write and self.dm.config.memory_write_granularity == "message_mean":
            segments = (torch.tensor(ids).eq(self.segment_start).long().cumsum(0) - 1).clamp_min(0)[None]
        call = _Call(state=state, valid=None, writes=None if write else torch.zeros(1, T, dtype=torch.bool),
                     segment_ids=segments, new_state=[None] * len(self.dm.layers))
        self.inner.layers, self.dm._call = self.top, call
        try:
            out = self.dm.model(inputs_embeds=h[None], position_ids=torch.arange(T)[None],
                                logits_to_keep=logits_to_keep)
        finally:
            self.inner.layers, self.dm._call = self.full, None
        return out.logits, torch.stack(call.new_state, 1)


def answer_logits(run: TopLayers, ep: Episode, cached: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the history into a zero state, answer read-only from it: (answer logits, targets)."""
    first = next(i for i, t in enumerate(ep.labels) if t != IGNORE)
    _, state = run(cached[0], run.dm.zero_state(1), True, 1, ep.write_ids)
    logits, _ = run(cached[1], state, False, len(ep.read_ids) - first + 1)
    return logits[0, :-1], torch.tensor(ep.labels[first:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--train", type=Path, default=Path("data/closed/train.jsonl"))
    ap.add_argument("--heldout", type=Path, default=Path("data/closed/heldout.jsonl"))
    ap.add_argument("--n", type=int, default=300, help="training conversations (each epoch passes over all)")
    ap.add_argument("--neval", type=int, default=48, help="held-out conversations scored")
    ap.add_argument("--layers", default="29", help="memory layers A or A-B")
    ap.add_argument("--cache-at", type=int, default=24, help="cache the residual stream entering this layer")
    ap.add_argument("--cache-file", type=Path, default=None, help="save/reuse the cache (same data and --cache-at)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--heads", default="q,o")
    ap.add_argument("--bias", type=float, default=-5.0, help="write-gate bias init")
    ap.add_argument("--granularity", default="token", choices=("token", "message_mean"))
    ap.add_argument("--delta-o-rmsnorm", action="store_true")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--accum", type=int, default=4, help="episodes per optimiser step")
    ap.add_argument("--decorrelate", type=int, default=32, help="write views for the decorrelated init (0: off)")
    ap.add_argument("--out", type=Path, default=None, help="write the trained adapter here")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lo, _, hi = args.layers.partition("-")
    layers = tuple(range(int(lo), int(hi or lo) + 1))
    if layers[0] < args.cache_at:
        sys.exit(f"top_layer_recall: --layers {args.layers} starts below --cache-at {args.cache_at}")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    config = DeltaMemConfig(rank=args.rank, alpha=args.alpha, delta_heads=tuple(args.heads.split(",")),
                            beta_bias_init=args.bias, target_layers=layers,
                            memory_write_granularity=args.granularity, delta_o_rmsnorm=args.delta_o_rmsnorm)
    dm = DeltaMemModel(model, config).eval()
    read = lambda path, n: [build_episode(tok, json.loads(line)["messages"])  # noqa: E731
                            for line in path.read_text().splitlines()[:n]]
    train, held = read(args.train, args.n), read(args.heldout, args.neval)
    if args.decorrelate:
        decorrelate_memory_projections(dm, train[:args.decorrelate])
    run = TopLayers(dm, args.cache_at, tok.convert_tokens_to_ids("<|im_start|>"))
    if args.cache_file and args.cache_file.exists():
        cache, held_cache = torch.load(args.cache_file)
    else:
        views = lambda eps, name: [(run.frozen_input(e.write_ids), run.frozen_input(e.read_ids))  # noqa: E731
                                   for e in tqdm(eps, desc=f"caching layers 0-{args.cache_at - 1}, {name}",
                                                 unit="conv", mininterval=5)]
        cache, held_cache = views(train, "train"), views(held, "held-out")
        if args.cache_file:
            torch.save((cache, held_cache), args.cache_file)

    @torch.no_grad()
    def exact() -> str:
        hits = sum(int((lg.argmax(-1) == tg).all()) for lg, tg in (answer_logits(run, e, c) for e, c in zip(held, held_cache)))
        return f"{hits}/{len(held)}"

    params = [p for p in dm.layers.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    print(f"memory in layers {layers}, rank {args.rank}, alpha {args.alpha}, heads {args.heads}, "
          f"{args.granularity}: held-out exact at start {exact()}", flush=True)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        order = list(range(len(train)))
        random.Random(epoch).shuffle(order)
        ce_sum = 0.0
        for j, i in enumerate(tqdm(order, desc=f"epoch {epoch + 1}", unit="ep", mininterval=5)):
            logits, targets = answer_logits(run, train[i], cache[i])
            ce = F.cross_entropy(logits, targets)
            (ce / args.accum).backward()
            ce_sum += float(ce.detach())
            if (j + 1) % args.accum == 0:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad()
        print(f"epoch {epoch + 1}: training answer ce {ce_sum / len(order):.3f}, held-out exact {exact()} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.out:
        save_adapter(dm.adapter(), args.out, formats=("safetensors",))
        print(f"adapter: {args.out}")


if __name__ == "__main__":
    main()
