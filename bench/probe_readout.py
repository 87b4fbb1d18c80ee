"""Can a backbone be made to say a remembered token by adding a vector to one attention output?

    python bench/probe_readout.py --model DIR [--data heldout.jsonl] [--fit-data train.jsonl] [--n 16]

Δ-Mem answers from memory only through additive corrections (δO to an attention layer's output, δQ
to its queries; the history is not in the KV cache). This probe measures the best such a correction
could do on a backbone, without training anything, for held-out recall questions: at the position
that should produce the fact's value ("Your name is" → "Nadia"), it adds to one layer's attention
output

- `embedding`: the value's own first-token embedding (what the tied unembedding reads), scaled to
  `gain` × the norm of that attention output — an upper bound for a memory that recalled the token
  perfectly and wrote it in the output's most useful form;
- `decoded`: what a rank-R linear map can recover of that embedding from the layer's attention input
  at the value's position in the history (ridge regression, fitted on `--fit-data` conversations) —
  what a memory that writes that layer's input and reads it back through δO could deliver;
- `predicting`: the layer's attention input, unchanged, at a history position where the backbone
  itself predicts the value next (when the assistant repeats it: "Nice to meet you, | Nadia"), for
  the questions that have one — a memory that copied that input would carry a prediction of the
  value rather than the value's own token.

It prints the value token's median rank among the vocabulary and how often it is the top choice,
per layer and gain, next to the backbone with no correction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from delta_mem_vllm.train.episodes import render_chat  # noqa: E402


def _attention_inputs(model, ids: list[int]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Each decoder layer's attention input (after its input norm) for one sequence, {layer: [T, H]},
    and the sequence's logits [T, V]."""
    seen: dict[int, torch.Tensor] = {}

    def capture(i):
        return lambda m, args, kwargs: seen.__setitem__(i, (kwargs.get("hidden_states", args[0] if args else None))[0])

    hooks = [layer.self_attn.register_forward_pre_hook(capture(i), with_kwargs=True)
             for i, layer in enumerate(model.model.layers)]
    try:
        logits = model(torch.tensor([ids])).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


def _value_question(tok, row) -> tuple[list[int], list[int], int] | None:
    """(history ids, ids up to where the value's first token is due, that token), or None when the
    token does not occur in the history as it does in the answer."""
    msgs = row["messages"]
    prompt, full = render_chat(tok, msgs[-2:-1], True), render_chat(tok, msgs[-2:], False)
    answer = full[len(prompt):]
    for text in (" " + row["answer"], row["answer"]):
        token = tok.encode(text, add_special_tokens=False)[0]
        if token in answer:
            break
    else:
        return None
    history = render_chat(tok, msgs[:-2], False)
    return (history, full[:len(prompt) + answer.index(token)], token) if token in history else None


def _predicting_position(history: list[int], logits: torch.Tensor, token: int) -> int | None:
    """The last history position whose next-token prediction (from the history's `logits`) is
    `token` and where `token` follows."""
    hits = [p - 1 for p in range(1, len(history)) if history[p] == token and int(logits[p - 1].argmax()) == token]
    return hits[-1] if hits else None


def _rank_with(model, ids: list[int], token: int, layer: int | None = None, vector: torch.Tensor | None = None,
               gain: float = 0.0) -> int:
    """The token's rank (0 = top choice) at the last position, with `vector` scaled to gain × the
    attention output's norm added to layer `layer`'s attention output there."""
    def add(module, args, out):
        o = out[0].clone()
        o[0, -1] += gain * vector * (o[0, -1].norm() / vector.norm())
        return (o, *out[1:])

    hook = model.model.layers[layer].self_attn.register_forward_hook(add) if layer is not None else None
    try:
        logits = model(torch.tensor([ids])).logits[0, -1]
    finally:
        if hook:
            hook.remove()
    return int((logits > logits[token]).sum())


def _fit_decoders(model, tok, rows, layers: list[int], ranks: list[int]) -> dict[tuple[int, int], torch.Tensor]:
    """Rank-R ridge maps from each layer's attention input to the embedding of the token there."""
    emb = model.get_input_embeddings().weight
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    ys = []
    for row in rows:
        ids = render_chat(tok, row["messages"], False)
        seen, _ = _attention_inputs(model, ids)
        for i in layers:
            xs[i].append(seen[i])
        ys.append(emb[torch.tensor(ids)])
    y = torch.cat(ys).double()
    maps = {}
    for i in layers:
        x = torch.cat(xs[i]).double()
        ridge = 1e-2 * x.pow(2).sum() / x.shape[1]
        full = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
        _, _, vh = torch.linalg.svd(x @ full, full_matrices=False)      # reduced-rank regression
        for r in ranks:
            maps[(i, r)] = (full @ vh[:r].T @ vh[:r]).float()
    return maps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("data/recall-short/heldout.jsonl"))
    ap.add_argument("--fit-data", type=Path, default=Path("data/recall/train.jsonl"))
    ap.add_argument("--fit-n", type=int, default=120, help="conversations the decoders are fitted on")
    ap.add_argument("--n", type=int, default=16, help="held-out questions probed")
    ap.add_argument("--layers", default="5,11,17,20,23,26,29")
    ap.add_argument("--gains", default="1,2")
    ap.add_argument("--ranks", default="32,128")
    args = ap.parse_args()
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    layers = [int(x) for x in args.layers.split(",")]
    gains = [float(x) for x in args.gains.split(",")]
    ranks = [int(x) for x in args.ranks.split(",")]
    fit = [json.loads(line) for line in args.fit_data.read_text().splitlines()[:args.fit_n]]
    decoders = _fit_decoders(model, tok, tqdm(fit, desc="fitting decoders", unit="conv"), layers, ranks)
    emb = model.get_input_embeddings().weight
    cases = [c for c in (_value_question(tok, json.loads(line)) for line in args.data.read_text().splitlines())
             if c][:args.n]
    ranked: dict[tuple, list[int]] = {}
    cosine: dict[tuple, list[float]] = {}
    with_prediction: list[int] = []          # the none-row ranks of the questions with a predicting position
    for history, ids, token in tqdm(cases, desc="probing", unit="question"):
        ranked.setdefault(("none",), []).append(_rank_with(model, ids, token))
        seen, logits = _attention_inputs(model, history)
        where = history.index(token)
        predicting = _predicting_position(history, logits, token)
        if predicting is not None:
            with_prediction.append(ranked[("none",)][-1])
        for i in layers:
            for g in gains:
                ranked.setdefault(("embedding", i, None, g), []).append(_rank_with(model, ids, token, i, emb[token], g))
            for r in ranks:
                decoded = seen[i][where] @ decoders[(i, r)]
                cosine.setdefault((i, r), []).append(float(F.cosine_similarity(decoded, emb[token], dim=0)))
                for g in gains:
                    ranked.setdefault(("decoded", i, r, g), []).append(_rank_with(model, ids, token, i, decoded, g))
            for g in gains if predicting is not None else ():
                ranked.setdefault(("predicting", i, None, g), []).append(
                    _rank_with(model, ids, token, i, seen[i][predicting], g))
    print(f"{len(cases)} held-out questions from {args.data}; decoders fitted on {len(fit)} conversations "
          f"from {args.fit_data}\n")
    print("| added to the attention output | layer | rank | gain | cos to the embedding | value rank (median) "
          "| top choice |\n|---|---|---|---|---|---|---|")
    for key, values in ranked.items():
        kind, *rest = key
        layer, r, g = rest if rest else ("–", None, None)
        cos = f"{statistics.median(cosine[(layer, r)]):.2f}" if kind == "decoded" else "–"
        print(f"| {kind} | {layer} | {r or '–'} | {g or '–'} | {cos} | {statistics.median(values):g} | "
              f"{sum(v == 0 for v in values)}/{len(values)} |")
    if with_prediction:
        print(f"\n`predicting` rows: the {len(with_prediction)} questions with such a position; for them alone, no "
              f"correction: median rank {statistics.median(with_prediction):g}, top choice "
              f"{sum(v == 0 for v in with_prediction)}/{len(with_prediction)}")


if __name__ == "__main__":
    main()
