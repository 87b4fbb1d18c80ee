"""Recall benchmark over the HTTP API (official `openai` client): what the memory buys.

    python bench/bench_recall.py --model DIR --adapter DIR [--data heldout.jsonl] [--n 100] [--write]

For each held-out conversation (facts told in earlier turns, asked ≥ 3 user turns later) the user
turns are sent one at a time into a session (the model answers each), then the question is asked:

- memory: in the session, only the question sent (the history reaches the model through the state);
- no memory: the same question without a session (zero state);
- full history: the whole conversation so far (with the model's own replies) plus the question in the
  prompt, without a session — what a client pays in prompt tokens without memory.

Reported per arm: accuracy (the fact's value in the answer, case-insensitive) with a 95% Wilson
interval, prompt tokens of the question turn, time to first token; and the bare backbone with the
whole conversation in its prompt, for scale. General ability (what the adapter changes elsewhere) is
bench/bench_general.py. `--write` stores the tables in bench/RESULTS-recall.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ARMS = ("memory", "no memory", "full history")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def recalled(answer: str, value: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(value.lower())}(?![\w])", answer.lower()) is not None


class Server:
    def __init__(self, model: Path, adapter: Path, engine: str, log: Path, extra: list[str] = ()) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--adapter", str(adapter),
               "--engine", engine, "--port", str(self.port), "--state-backend", "memory", "--served-model-name", "m",
               "--log-level", "warning", "--max-model-len", "4096", *extra]
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        self.url = f"http://127.0.0.1:{self.port}"
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: see {log}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server not ready after 600 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def ask(client: Any, messages: list[dict], session: str | None, max_tokens: int) -> dict[str, Any]:
    """One streamed turn: the reply, prompt tokens and time to first token."""
    extra = {"session_id": session} if session else {}
    t0 = time.perf_counter()
    ttft, parts, usage = None, [], None
    for chunk in client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body=extra):
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    return {"text": "".join(parts), "prompt_tokens": usage.prompt_tokens if usage else None,
            "ttft": ttft if ttft is not None else time.perf_counter() - t0}


def run_conversation(client: Any, i: int, row: dict, reply_tokens: int, answer_tokens: int) -> dict[str, Any]:
    history = row["messages"][:-2]
    question = row["messages"][-2]
    sid = f"recall-{i}"
    seen: list[dict] = []
    for m in history:
        if m["role"] != "user":
            continue
        reply = ask(client, [m], sid, reply_tokens)["text"]
        seen += [m, {"role": "assistant", "content": reply}]
    out = {"answer": row["answer"], "kind": row["kind"], "gap": row["gap"]}
    for arm, msgs, session in (("memory", [question], sid), ("no memory", [question], None),
                               ("full history", seen + [question], None)):
        r = ask(client, msgs, session, answer_tokens)
        out[arm] = {**r, "ok": recalled(r["text"], row["answer"])}
    return out


def bare_answers(model_dir: Path, chats: list[list[dict]], max_tokens: int) -> list[str]:
    """The bare backbone's greedy replies (transformers, no adapter) to each chat."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for messages in chats:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        out.append(tok.decode(gen[0][ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None, help="held-out JSONL (default: generated, seed 0)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--reply-tokens", type=int, default=24)
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="float32", help="the server's --dtype")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    import openai

    from delta_mem_vllm.train.data import conversations, read_jsonl

    rows = (read_jsonl(args.data) if args.data else list(conversations(args.n, "heldout", 0, min_gap=3)))[:args.n]
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args.model, args.adapter, args.engine, Path(tmp) / "server.log", ["--dtype", args.dtype])
        try:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
            t0 = time.perf_counter()
            done = 0

            def one(item: tuple[int, dict]) -> dict:
                nonlocal done
                result = run_conversation(client, item[0], item[1], args.reply_tokens, args.answer_tokens)
                done += 1
                if done % 10 == 0 or done == len(rows):
                    rate = done / (time.perf_counter() - t0)
                    print(f"  {done}/{len(rows)} conversations ({rate:.2f}/s)", flush=True)
                return result

            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, enumerate(rows)))
            wall = time.perf_counter() - t0
        finally:
            server.stop()

    lines = [f"Recall on {len(results)} held-out conversations (facts asked ≥ 3 user turns after they were told; "
             f"gap median {statistics.median(r['gap'] for r in results)}), {args.engine} engine, greedy, "
             f"{args.answer_tokens}-token answers; {wall / 60:.1f} min.", "",
             "| arm | accuracy | 95% interval | prompt tokens (question turn, median) | TTFT median |",
             "|---|---|---|---|---|"]
    for arm in ARMS:
        k = sum(r[arm]["ok"] for r in results)
        lo, hi = wilson(k, len(results))
        tokens = statistics.median(r[arm]["prompt_tokens"] for r in results)
        ttft = statistics.median(r[arm]["ttft"] for r in results)
        lines.append(f"| {arm} | {k}/{len(results)} = {k / len(results):.0%} | {lo:.0%}–{hi:.0%} | {tokens:.0f} | "
                     f"{ttft * 1000:.0f} ms |")
    by_kind = {}
    for r in results:
        by_kind.setdefault(r["kind"], []).append(r)
    lines += ["", "| fact | n | memory | no memory | full history |", "|---|---|---|---|---|"]
    for kind, rs in sorted(by_kind.items()):
        lines.append(f"| {kind} | {len(rs)} | " + " | ".join(f"{sum(r[a]['ok'] for r in rs)}" for a in ARMS) + " |")
    # the bare backbone with the whole conversation (the data's own replies) in its prompt, for scale
    full = bare_answers(args.model, [r["messages"][:-1] for r in rows], args.answer_tokens)
    ceiling = sum(recalled(text, r["answer"]) for text, r in zip(full, rows))
    lo, hi = wilson(ceiling, len(rows))
    lines += ["", f"Bare backbone (no adapter, transformers) with the whole conversation in the prompt: "
              f"{ceiling}/{len(rows)} = {ceiling / len(rows):.0%} ({lo:.0%}–{hi:.0%})."]
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), {platform.system()}"
    report = "\n".join(lines)
    print(report)
    if args.write:
        out = REPO / "bench" / "RESULTS-recall.md"
        out.write_text(f"# Recall benchmark\n\nMachine: {machine}. Model {args.model.name}, adapter "
                       f"{args.adapter}. Command: `python bench/bench_recall.py {' '.join(sys.argv[1:])}`\n\n"
                       f"{report}\n")
        (REPO / "bench" / "recall-answers.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
