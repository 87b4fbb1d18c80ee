"""Keep data: turns and texts whose replies the memory must leave as the bare backbone gives them.

Nothing comes from a hub. The questions are written by the backbone itself (sampled as a user turn
from its own chat template, so they are the kind of request it was tuned on), the replies are its own
greedy replies to each question sent alone (what a memory-mode client sends), and the plain texts are
docstrings of the Python standard library, read from its source files without importing anything.

Rows (JSONL, for `delta-mem-vllm train --keep-data`):

- `{"messages": [question, reply]}`: the question without a session (the no-session mode writes it);
- `{"messages": [*history, question, reply]}`: the same after a recall conversation's history;
- `{"messages": [*history[:k], turn_k, reply]}`: a recall conversation's own earlier turns (telling a
  fact, small talk), answered as the backbone answers them alone;
- `{"text": passage}`: plain text without a session.

The trainer scores each against the backbone's next-token distribution (`trainer.kl_to_backbone`).
"""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

SENTINEL = "\x00"


def user_turn_prefix(tokenizer: Any) -> str:
    """The chat template's text up to a user message's content (the default system prompt included)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False)
    return text[:text.index(SENTINEL)]


def _generate(model: Any, tokenizer: Any, prompts: Sequence[str], max_tokens: int, sample: bool, batch: int,
              desc: str, seed: int = 0) -> list[str]:
    """Continuations of `prompts` (template text), left-padded in batches, each up to the end of its turn."""
    from tqdm import tqdm

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    torch.manual_seed(seed)
    try:
        for start in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch", mininterval=2):
            enc = tokenizer(list(prompts[start:start + batch]), return_tensors="pt", padding=True,
                            add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_tokens, do_sample=sample, top_p=0.9 if sample else None,
                                     temperature=0.7 if sample else None, top_k=None,
                                     pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [text.strip() for text in out]


# first words a short question may start with; the backbone writes the rest (left alone, it writes
# long requests: "I'm planning to launch a new business, … Can you provide …")
OPENERS = ("What is", "What are", "Who", "How many", "How do", "Why", "Name", "Give me", "Write", "List", "Explain",
           "Translate", "Describe", "Tell me", "Which", "Where is", "When did", "Can you", "Suggest", "Summarise")


def sample_questions(model: Any, tokenizer: Any, n: int, seed: int = 0, max_tokens: int = 40,
                     batch: int = 32, exclude: Sequence[str] = (), short: bool = False) -> list[str]:
    """`n` distinct user requests written by the backbone (sampled from its user-turn prefix), of 3–40
    words, none of them in `exclude` (e.g. a benchmark's prompts). `short`: each starts with one of
    `OPENERS` and stops at the end of its first line, at most 16 words (questions like a quick chat's)."""
    prefix = user_turn_prefix(tokenizer)
    seen = {q.strip().lower() for q in exclude}
    found: list[str] = []
    rng = random.Random(seed)
    for attempt in range(20):
        openers = [rng.choice(OPENERS) if short else "" for _ in range(batch * 4)]
        texts = _generate(model, tokenizer, [prefix + o for o in openers], 20 if short else max_tokens, True, batch,
                          f"questions by the backbone ({len(found)}/{n})", seed=seed * 1000 + attempt)
        for opener, text in zip(openers, texts):
            text = f"{opener} {text.splitlines()[0] if text else ''}".strip() if short else text
            words = text.split()
            if 3 <= len(words) <= (16 if short else 40) and text.lower() not in seen and SENTINEL not in text \
                    and (not short or text.endswith(("?", "."))):
                seen.add(text.lower())
                found.append(text)
        if len(found) >= n:
            return found[:n]
    raise RuntimeError(f"the backbone wrote only {len(found)} usable distinct questions of {n}")


def greedy_replies(model: Any, tokenizer: Any, questions: Sequence[str], max_tokens: int = 32,
                   batch: int = 32) -> dict[str, str]:
    """The backbone's greedy reply to each question sent alone."""
    distinct = list(dict.fromkeys(questions))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in distinct]
    return dict(zip(distinct, _generate(model, tokenizer, prompts, max_tokens, False, batch, "backbone replies")))


def stdlib_passages(n: int, min_chars: int = 400, max_chars: int = 1500, seed: int = 0) -> list[str]:
    """`n` prose passages: docstrings of the Python standard library (module, class and function
    docstrings of at least `min_chars`, cut at a paragraph within `max_chars`), parsed, never imported."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= min_chars and ">>>" not in doc:
                    docs.append(_cut(doc, max_chars))
    docs = list(dict.fromkeys(docs))
    random.Random(seed).shuffle(docs)
    if len(docs) < n:
        raise RuntimeError(f"only {len(docs)} standard-library docstrings of at least {min_chars} characters")
    return docs[:n]


def _cut(text: str, limit: int) -> str:
    """`text` up to the last paragraph break within `limit` characters (or the limit)."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    return text[:cut if cut > limit // 3 else limit]


def _turns(history: Sequence[dict[str, str]]) -> list[int]:
    """Indices of the user messages in `history` (a turn starts at each)."""
    return [i for i, m in enumerate(history) if m["role"] == "user"]


def keep_rows(questions: Sequence[str], histories: Sequence[Sequence[dict[str, str]]], replies: dict[str, str],
              passages: Sequence[str], seed: int = 0) -> Iterator[dict[str, Any]]:
    """Every question without a session and once after a random history, each history's turns at a
    random point answered as the backbone answers them alone, and every passage."""
    rng = random.Random(seed)
    for q in questions:
        yield {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": replies[q]}],
               "kind": "keep-alone"}
        history = list(rng.choice(histories)) if histories else []
        yield {"messages": [*history, {"role": "user", "content": q}, {"role": "assistant", "content": replies[q]}],
               "kind": "keep-after-history"}
    for history in histories:
        starts = _turns(history)
        if not starts:
            continue
        k = rng.choice(starts)
        turn = history[k]["content"]
        yield {"messages": [*history[:k], {"role": "user", "content": turn},
                            {"role": "assistant", "content": replies[turn]}], "kind": "keep-own-turn"}
    for text in passages:
        yield {"text": text, "kind": "keep-text"}


def history_questions(histories: Sequence[Sequence[dict[str, str]]]) -> list[str]:
    """The user messages of the histories (their replies are needed for the own-turn rows)."""
    return list(dict.fromkeys(m["content"] for h in histories for m in h if m["role"] == "user"))
