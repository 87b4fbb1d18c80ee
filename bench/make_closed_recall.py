"""Closed-set recall conversations: the easiest test of whether a memory learns anything at all.

    python bench/make_closed_recall.py --out data/closed --train 3000 --heldout 100

One fact, a favourite colour out of 8 (each one token in SmolLM2's vocabulary), told in the first
turn and asked after 0–2 small-talk turns. Unlike `delta-mem-vllm make-data` (open value pools,
held-out values never seen in training) the answer here is an 8-way choice the training data covers
many times, so a memory only has to carry which of 8 it heard: chance is 1/8.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "black")
SMALL_TALK = (("The weather is nice today.", "It sounds like a lovely day."),
              ("I went for a walk this morning.", "A walk is a great way to start the day."),
              ("I am reading a book about history.", "History books can be fascinating."),
              ("My sister visited me yesterday.", "That must have been nice."),
              ("I had pasta for lunch.", "Pasta is a good choice."),
              ("I need to buy new shoes.", "I hope you find a good pair."))


def conversation(rng: random.Random) -> dict:
    colour = rng.choice(COLOURS)
    messages = [{"role": "user", "content": f"My favourite colour is {colour}."},
                {"role": "assistant", "content": f"Noted, your favourite colour is {colour}."}]
    for user, reply in rng.sample(SMALL_TALK, rng.randint(0, 2)):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    messages += [{"role": "user", "content": "What is my favourite colour?"},
                 {"role": "assistant", "content": f"Your favourite colour is {colour}."}]
    return {"messages": messages, "answer": colour, "kind": "colour"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data/closed"))
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--heldout", type=int, default=100)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", args.train, 0), ("heldout", args.heldout, 1)):
        rng = random.Random(seed)
        with open(args.out / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(conversation(rng)) + "\n")
    print(f"{args.train} training and {args.heldout} held-out conversations in {args.out}")


if __name__ == "__main__":
    main()
