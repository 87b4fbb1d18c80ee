"""Keep-ability rows: an unrelated question after a recall conversation, answered as the bare backbone answers it.

Superseded by `delta-mem-vllm make-keep-data` and `train --keep-data` (the whole next-token
distribution matched to the backbone's, not its greedy reply as a target); kept to reproduce run 15.

    python bench/make_keep_data.py --model DIR --history data/closed1/train.jsonl --out data/keep/train.jsonl

Mixed into `delta-mem-vllm train --data`, these teach the memory to stay out of answers that do not
ask for what it holds: the history (facts, small talk) is written as usual, then a general question
is scored against the backbone's own greedy reply to it alone (what a memory-mode client sends).
Without them a recall adapter answers every question in its trained form ("The number is 2.").
The questions here are not the recall benchmark's single-turn prompts, which stay unseen.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from self_replies import backbone_replies  # the same directory: python bench/make_keep_data.py

QUESTIONS = [
    "What is the capital of France?", "What is the capital of Italy?", "What is the largest planet?",
    "How many days are in a week?", "What is water made of?", "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?", "How many legs does a spider have?", "What is photosynthesis?",
    "Why is the sky blue?", "What is the opposite of hot?", "How do I boil an egg?",
    "Give me a synonym for happy.", "What is 5 times 6?", "What is the square root of 81?",
    "Name a fruit that is yellow.", "What language is spoken in Brazil?", "How many continents are there?",
    "What is the tallest mountain in the world?", "What does a bee make?", "Write a haiku about rain.",
    "Explain gravity in one sentence.", "What is a noun?", "How do birds fly?", "What is the moon made of?",
    "Suggest a name for a bakery.", "What is the freezing point of water?", "What do pandas eat?",
    "What is the fastest land animal?", "How many hours are in a day?", "What is an atom?",
    "Tell me a fun fact about the ocean.", "What is the currency of Japan?", "How do I make tea?",
    "What is democracy?", "What colour is a banana?", "What is the largest ocean?",
    "Who painted the Mona Lisa?", "What is a verb?", "How many minutes are in an hour?",
    "What is the chemical symbol for gold?", "Name three primary colours.", "What is a triangle?",
    "What do plants need to grow?", "How far is the moon?", "What is the plural of mouse?",
    "Describe a cat in one sentence.", "What is 100 divided by 4?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--history", type=Path, required=True, help="recall JSONL whose histories precede the questions")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=400, help="rows")
    ap.add_argument("--max-tokens", type=int, default=32, help="length of the backbone's replies")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    replies = backbone_replies(args.model, QUESTIONS, args.max_tokens)
    histories = [json.loads(line)["messages"][:-2] for line in args.history.read_text().splitlines()]
    rng = random.Random(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for _ in range(args.n):
            q = rng.choice(QUESTIONS)
            messages = rng.choice(histories) + [{"role": "user", "content": q}, {"role": "assistant", "content": replies[q]}]
            f.write(json.dumps({"messages": messages, "kind": "keep"}) + "\n")
    print(f"{args.n} rows ({len(QUESTIONS)} questions) in {args.out}")


if __name__ == "__main__":
    main()
