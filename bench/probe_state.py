"""Where does a remembered fact get lost: in the written state, or in the read at the answer?

    python bench/probe_state.py --model DIR --data data/closed/train.jsonl [--adapter DIR] \
        [--fit 150 --test 48] [--layers 5,11,17,23,29]

For conversations whose answer is one of a few values (`bench/make_closed_recall.py`), the history
is written into a Δ-Mem state and the question is run read-only from it, as in training. Then, per
layer, a linear classifier (multinomial logistic regression, fitted on `--fit` conversations, scored
on the next `--test`) says how well the value can be told from

- `input`: the layer's attention input at the value's token in the history — what any write could
  take in;
- `state`: the layer's whole R×R state after the history — what the writes kept;
- `read`: the R-wide read S·q at the position that must say the value — what the corrections get.

Without `--adapter` the memory is a fresh one (rank 8, write-gate bias −5, projections decorrelated
as `train --decorrelate-init 32` does): what training starts from. With a trained adapter: what it
learned to keep and read. Chance is 1 / the number of values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from delta_mem_vllm.config import DeltaMemConfig  # noqa: E402
from delta_mem_vllm.hf.model import DeltaMemModel  # noqa: E402
from delta_mem_vllm.train.episodes import IGNORE, build_episode  # noqa: E402
from delta_mem_vllm.train.trainer import decorrelate_memory_projections  # noqa: E402


@torch.no_grad()
def _features(dm: DeltaMemModel, tok, row: dict, layers: list[int],
              index: dict[int, int]) -> dict[str, dict[int, torch.Tensor]] | None:
    """The three feature sets of one conversation, per layer (`index`: decoder layer → memory layer);
    None when the value is not found."""
    ep = build_episode(tok, row["messages"])
    value = tok.encode(" " + row["answer"], add_special_tokens=False)[0]
    first = next(i for i, t in enumerate(ep.labels) if t != IGNORE)
    if value not in ep.write_ids or value not in ep.read_ids[first:]:
        return None
    at_value = ep.write_ids.index(value)
    predicting = first + ep.read_ids[first:].index(value) - 1
    seen: dict[int, torch.Tensor] = {}
    hooks = [dm.model.model.layers[i].self_attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.__setitem__(i, kw.get("hidden_states", a[0] if a else None)[0]), with_kwargs=True)
        for i in layers]
    try:
        state = dm(torch.tensor([ep.write_ids]), write=True, logits_to_keep=1).state[0]    # [L,h,R,R]
        written = {i: seen[i][at_value] for i in layers}
        dm(torch.tensor([ep.read_ids]), state=state[None], write=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, dict[int, torch.Tensor]] = {"input": written, "state": {}, "read": {}}
    for i in layers:
        layer, S = dm.layers[index[i]], state[index[i]]
        q = layer.project(seen[i][predicting])[0]                       # [h, R]
        out["state"][i] = S.flatten()
        out["read"][i] = torch.einsum("hij,hj->hi", S, q).flatten()
    return out


def _accuracy(x: torch.Tensor, y: torch.Tensor, n_fit: int, classes: int) -> float:
    """Held-out accuracy of an L2-regularised softmax classifier on standardised features."""
    fit, test = x[:n_fit], x[n_fit:]
    mu, sd = fit.mean(0), fit.std(0) + 1e-6
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(500):
        opt.zero_grad()
        loss = F.cross_entropy((fit - mu) / sd @ w + b, y[:n_fit]) + 1e-3 * w.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(((test - mu) / sd @ w + b).argmax(-1).eq(y[n_fit:]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("data/closed/train.jsonl"))
    ap.add_argument("--adapter", type=Path, default=None, help="a trained adapter (default: a fresh memory)")
    ap.add_argument("--fit", type=int, default=150, help="conversations the classifiers are fitted on")
    ap.add_argument("--test", type=int, default=48, help="conversations they are scored on")
    ap.add_argument("--layers", default="5,11,17,23,29")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = [json.loads(line) for line in args.data.read_text().splitlines()][:args.fit + args.test]
    layers = [int(x) for x in args.layers.split(",")]
    if args.adapter:
        dm = DeltaMemModel.from_pretrained(args.model, args.adapter)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
        dm = DeltaMemModel(model, DeltaMemConfig(beta_bias_init=-5.0)).eval()
        decorrelate_memory_projections(dm, [build_episode(tok, r["messages"]) for r in rows[:32]])
    index = {int(name.split(".")[-2]): j for j, name in enumerate(dm.layer_names)}   # "model.layers.29.self_attn"
    if not set(layers) <= set(index):
        sys.exit(f"probe_state: --layers {sorted(set(layers) - set(index))} have no memory in this adapter")
    feats, labels = [], []
    for row in tqdm(rows, desc="conversations", unit="conv", mininterval=5):
        f = _features(dm, tok, row, layers, index)
        if f is not None:
            feats.append(f)
            labels.append(row["answer"])
    values = sorted(set(labels))
    y = torch.tensor([values.index(v) for v in labels])
    n_fit = min(args.fit, len(feats) - 1)
    print(f"\n{len(feats)} conversations ({n_fit} fit, {len(feats) - n_fit} scored), {len(values)} values: "
          f"chance {1 / len(values):.3f}; memory: {args.adapter or 'fresh (rank 8, bias -5, decorrelated)'}\n")
    print("| layer | input at the value | whole state | read at the answer |")
    print("|---|---|---|---|")
    for i in layers:
        acc = [_accuracy(torch.stack([f[k][i] for f in feats]).float(), y, n_fit, len(values))
               for k in ("input", "state", "read")]
        print(f"| {i} | " + " | ".join(f"{a:.3f}" for a in acc) + " |")


if __name__ == "__main__":
    main()
