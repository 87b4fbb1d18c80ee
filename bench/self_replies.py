"""Rewrite a conversation file's history replies as the backbone's own replies: the served token stream.

    python bench/self_replies.py --model DIR --data data/closed1/train.jsonl --out data/closed1-self/train.jsonl

Served in memory mode, every earlier turn's reply is the model's own, generated from that turn alone
(the client sends only the new turn), and it is written into the state with the user's message. The
generated data has short canned replies instead ("Good to know you live in Tokyo."), so an adapter
trained on it meets a different stream when served. This replaces each history reply with the bare
backbone's greedy reply to its user message alone (`--max-tokens`, as a client caps replies), once per
distinct message. The question and its answer, the training target, are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm


def backbone_replies(model_dir: Path, messages: list[str], max_tokens: int) -> dict[str, str]:
    """The bare backbone's greedy reply to each user message sent alone (as a memory-mode client sends it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    replies = {}
    for text in tqdm(messages, desc="backbone replies", unit="message", file=sys.stderr):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        replies[text] = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return replies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=24, help="reply length cap, as the served client sets it")
    args = ap.parse_args()
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    users = sorted({m["content"] for r in rows for m in r["messages"][:-2] if m["role"] == "user"})
    replies = backbone_replies(args.model, users, args.max_tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for r in rows:
            history = r["messages"][:-2]
            for i, m in enumerate(history[1:], 1):
                if m["role"] == "assistant" and history[i - 1]["role"] == "user":
                    m["content"] = replies[history[i - 1]["content"]]
            f.write(json.dumps(r) + "\n")
    print(f"{len(rows)} conversations, {len(users)} distinct user messages replied to, in {args.out}")


if __name__ == "__main__":
    main()
