"""`delta-mem-vllm make-data`, `make-keep-data` and `train` (argument parsing and wiring only)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

log = logging.getLogger("deltamem.train")


def add_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("make-data", help="write recall conversations: train.jsonl and heldout.jsonl")
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--train", type=int, default=4000, help="training conversations")
    data.add_argument("--heldout", type=int, default=200, help="held-out conversations (values never trained on)")
    data.add_argument("--min-gap", type=int, default=1, help="user turns at least between a fact and its question "
                                                               "(held-out: at least 3)")
    data.add_argument("--max-turns", type=int, default=8)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--max-facts", type=int, default=3, choices=range(1, 9), metavar="{1..8}",
                      help="facts told per conversation at most (1 for a first curriculum stage)")
    data.add_argument("--values", choices=("open", "closed"), default="open",
                      help="open: large pools, held-out values never trained on; closed: eight values per kind, "
                           "shared by both splits (a 1-in-8 choice the memory has to carry)")

    keep = sub.add_parser("make-keep-data", help="write keep rows: turns and texts the memory must leave as the "
                                                 "backbone answers them (questions and replies by the backbone)")
    keep.add_argument("--model", type=Path, required=True, help="the backbone (transformers checkpoint directory)")
    keep.add_argument("--history", type=Path, required=True,
                      help="recall JSONL (make-data) whose histories precede the questions")
    keep.add_argument("--out", type=Path, required=True, help="directory for train.jsonl and heldout.jsonl")
    keep.add_argument("--questions", type=int, default=400, help="training questions written by the backbone")
    keep.add_argument("--short", action="store_true",
                      help="short questions (the backbone completes an opener such as 'What is' or 'Name')")
    keep.add_argument("--histories", type=int, default=400, help="recall histories whose own turns are kept")
    keep.add_argument("--passages", type=int, default=200, help="plain-text passages (standard-library docstrings)")
    keep.add_argument("--heldout", type=int, default=48, help="held-out questions and passages (each)")
    keep.add_argument("--max-tokens", type=int, default=32, help="length of the backbone's replies")
    keep.add_argument("--exclude", type=Path, default=None,
                      help="a file of prompts (one per line) never used as questions, e.g. a benchmark's")
    keep.add_argument("--seed", type=int, default=0)
    keep.add_argument("--threads", type=int, default=None, help="torch intra-op threads")

    train = sub.add_parser("train", help="train a Δ-Mem adapter for a frozen backbone (the reference recipe)")
    train.add_argument("--model", type=Path, required=True, help="transformers checkpoint directory")
    train.add_argument("--data", type=Path, action="append", default=[],
                       help="JSONL of {messages: [...]} rows ending with the assistant answer (repeatable)")
    train.add_argument("--locomo", type=Path, action="append", default=[], help="a LoCoMo-format file (repeatable)")
    train.add_argument("--out", type=Path, required=True, help="run directory: checkpoints, then adapter/")
    train.add_argument("--steps", type=int, default=300)
    train.add_argument("--grad-accum", type=int, default=4)
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--warmup", type=float, default=0.1)
    train.add_argument("--reg-weight", type=float, default=0.01)
    train.add_argument("--reg-target", type=float, default=0.05)
    train.add_argument("--rank", type=int, default=8)
    train.add_argument("--alpha", type=float, default=None,
                       help="correction scale numerator (scale = alpha/rank; default 2×rank as the reference). Reads "
                            "from a slowly written state are small: a larger alpha lets the corrections grow faster")
    train.add_argument("--delta-heads", default="q,o", help="projections the memory corrects (q,k,v,o)")
    train.add_argument("--layers", type=_layer_list, default=(), metavar="A-B[,C...]",
                       help="decoder layers that get a memory (default: all); with fewer layers a higher rank "
                            "keeps the adapter small")
    train.add_argument("--beta-bias-init", type=float, default=-1.5,
                       help="initial write-gate bias (the reference's -1.5 forgets within ~20 tokens; lower keeps "
                            "earlier turns, so their gradients reach the gates: -5 keeps about a third after 150)")
    train.add_argument("--max-write", type=int, default=8192, help="write-view tokens (left-truncated)")
    train.add_argument("--max-read", type=int, default=512, help="read-view tokens (left-truncated)")
    train.add_argument("--decorrelate-init", type=int, default=0, metavar="N",
                       help="take each layer's mean input direction out of the fresh memory q/k/v projections, "
                            "estimated on N write views (otherwise every token writes nearly the same vector)")
    train.add_argument("--read-writes", action="store_true",
                       help="the read view writes its question and answer into the state, as a served turn does "
                            "(the reference's read view is read-only)")
    train.add_argument("--no-frozen-prefix", action="store_true",
                       help="run the whole backbone every episode; by default, when every memory layer is above "
                            "layer 0, the layers below the first are run once per conversation and cached (hidden size × 4 "
                            "bytes per token, in memory and in OUT/frozen-prefix.pt)")
    train.add_argument("--init-adapter", type=Path, default=None,
                       help="start from this adapter's weights (e.g. a curriculum's earlier stage) instead of the init")
    train.add_argument("--keep-data", type=Path, action="append", default=[],
                       help="keep rows (make-keep-data), mixed into the training data: the memory's next-token "
                            "distribution is matched to the bare backbone's there (repeatable)")
    train.add_argument("--keep-weight", type=float, default=1.0, help="weight of the keep rows' KL to the backbone")
    train.add_argument("--eval-keep-data", type=Path, default=None,
                       help="held-out keep rows scored during training (mean KL to the backbone; the first --eval-n)")
    train.add_argument("--save-every", type=int, default=50)
    train.add_argument("--eval-data", type=Path, default=None,
                       help="held-out JSONL scored during training (answer loss and accuracy, memory vs none)")
    train.add_argument("--eval-n", type=int, default=32, help="held-out conversations scored (the first N)")
    train.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations")
    train.add_argument("--time-budget", type=float, default=None, help="minutes; stop with a checkpoint, resume later")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--device", default="auto")
    train.add_argument("--bf16", action="store_true", help="backbone matmuls under bf16 autocast")
    train.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def _layer_list(text: str) -> tuple[int, ...]:
    """'12-15,20' -> (12, 13, 14, 15, 20)."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            layers += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give layer indices like 12-15,20") from None
    return tuple(sorted(set(layers)))


def make_data(args: argparse.Namespace) -> int:
    from .data import conversations, write_jsonl

    try:
        train = conversations(args.train, "train", args.seed, min_gap=args.min_gap, max_turns=args.max_turns,
                              values=args.values, max_facts=args.max_facts)
        held = conversations(args.heldout, "heldout", args.seed, min_gap=max(3, args.min_gap),
                             max_turns=args.max_turns, values=args.values, max_facts=args.max_facts)
    except RuntimeError as exc:
        print(f"delta-mem-vllm: error: {exc}", file=sys.stderr)
        return 2
    n = write_jsonl(train, args.out / "train.jsonl")
    m = write_jsonl(held, args.out / "heldout.jsonl")
    print(f"{n} training and {m} held-out conversations in {args.out}")
    return 0


def make_keep_data(args: argparse.Namespace) -> int:
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import read_jsonl, write_jsonl
    from .keep import greedy_replies, history_questions, keep_rows, sample_questions, stdlib_passages

    for path in (args.model, args.history, *([args.exclude] if args.exclude else [])):
        if not path.exists():
            print(f"delta-mem-vllm: error: {path}: no such file or directory", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    exclude = [line for line in args.exclude.read_text().splitlines() if line.strip()] if args.exclude else []
    rows = read_jsonl(args.history)
    random.Random(args.seed).shuffle(rows)
    histories = [r["messages"][:-2] for r in rows[:args.histories]]
    try:
        questions = sample_questions(model, tok, args.questions + args.heldout, args.seed, exclude=exclude,
                                     short=args.short)
        passages = stdlib_passages(args.passages + args.heldout, seed=args.seed)
    except RuntimeError as exc:
        print(f"delta-mem-vllm: error: {exc}", file=sys.stderr)
        return 2
    replies = greedy_replies(model, tok, questions + history_questions(histories), args.max_tokens)
    n = write_jsonl(keep_rows(questions[:args.questions], histories, replies, passages[:args.passages], args.seed),
                    args.out / "train.jsonl")
    m = write_jsonl(keep_rows(questions[args.questions:], histories[:args.heldout], replies,
                              passages[args.passages:], args.seed + 1), args.out / "heldout.jsonl")
    print(f"{n} training and {m} held-out keep rows in {args.out}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..adapter import load_adapter
    from ..config import DeltaMemConfig
    from .data import load_locomo, read_jsonl
    from .episodes import build_episode, build_keep_episode
    from .trainer import TrainConfig, train

    if not args.data and not args.locomo:
        print("delta-mem-vllm: error: give --data and/or --locomo", file=sys.stderr)
        return 2
    for path in [*args.data, *args.locomo, *args.keep_data, args.model,
                 *(p for p in (args.eval_data, args.eval_keep_data, args.init_adapter) if p)]:
        if not path.exists():
            print(f"delta-mem-vllm: error: {path}: no such file or directory", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).eval()
    n_layers = model.config.num_hidden_layers
    if any(i >= n_layers for i in args.layers):
        print(f"delta-mem-vllm: error: --layers: {args.model} has layers 0-{n_layers - 1}", file=sys.stderr)
        return 2
    rows = [r for p in args.data for r in read_jsonl(p)] + [r for p in args.locomo for r in load_locomo(p)]
    episodes = [build_episode(tok, r["messages"], args.max_write, args.max_read)
                for r in tqdm(rows, desc="tokenising", unit="conv")]
    episodes += [build_keep_episode(tok, r, args.max_write, args.max_read)
                 for p in args.keep_data for r in tqdm(read_jsonl(p), desc="tokenising keep rows", unit="row")]
    held = [build_episode(tok, r["messages"], args.max_write, args.max_read)
            for r in read_jsonl(args.eval_data)[:args.eval_n]] if args.eval_data else []
    held += [build_keep_episode(tok, r, args.max_write, args.max_read)
             for r in read_jsonl(args.eval_keep_data)[:args.eval_n]] if args.eval_keep_data else []
    note = ", ".join(str(p) for p in [*args.data, *args.locomo]) + (
        f"; keep: {', '.join(str(p) for p in args.keep_data)} (weight {args.keep_weight})" if args.keep_data else "")
    cfg = TrainConfig(steps=args.steps, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup,
                      reg_weight=args.reg_weight, reg_target=args.reg_target, seed=args.seed,
                      save_every=args.save_every, eval_every=args.eval_every, autocast_bf16=args.bf16,
                      decorrelate_init=args.decorrelate_init, read_writes=args.read_writes,
                      frozen_prefix=not args.no_frozen_prefix, keep_weight=args.keep_weight)
    # an initial adapter brings its own configuration; --rank/--alpha/... shape a fresh one
    start = load_adapter(args.init_adapter) if args.init_adapter else DeltaMemConfig(
        rank=args.rank, alpha=args.alpha or 2.0 * args.rank, delta_heads=args.delta_heads,
        beta_bias_init=args.beta_bias_init, target_layers=args.layers)
    done = train(model, episodes, args.out, cfg, start, data_note=note,
                 stop_after=args.time_budget * 60 if args.time_budget else None, eval_episodes=held,
                 command=shlex.join(["delta-mem-vllm", *sys.argv[1:]]))
    if done is None:
        print(f"stopped by --time-budget; run the same command again to resume from {args.out}")
        return 0
    print(f"adapter: {done}")
    print(f"serve:   delta-mem-vllm serve --model {args.model} --adapter {done}")
    return 0
