"""General-ability benchmark: does an adapter leave the backbone as it was where the memory has nothing to add?

    python bench/bench_general.py --model DIR --adapter DIR [--engine torch,vllm] [--write LABEL]

Two measurements, side by side with the bare backbone:

- perplexity on a plain text that ships with the system (/usr/share/common-licenses/GPL-3, first
  20,000 characters, 512-token windows), the adapter from a zero state with writes on (what a request
  without a session does);
- greedy replies (32 tokens) to the fixed single-turn prompts in bench/general-prompts.txt, served
  over HTTP: without a session, and in a session after two unrelated turns (a fact and small talk,
  the model's own replies written as served). The bare backbone is served by the same engine with a
  null adapter (fresh, zero output maps: every correction is exactly zero), so both sides go through
  the same code; "identical" means the same reply text.

With several engines, their replies are compared too (they should agree). `--write LABEL` appends
the tables to bench/RESULTS-general.md under that label, with the machine named.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_engine import cpu_name  # noqa: E402  (the same directory)
from bench_recall import Server, ask  # noqa: E402

PLAIN_TEXT = Path("/usr/share/common-licenses/GPL-3")
PROMPTS = [line.strip() for line in (REPO / "bench" / "general-prompts.txt").read_text().splitlines() if line.strip()]
UNRELATED_TURNS = ["My name is Sarah.", "I spent the morning cleaning the garage."]
ARMS = ("no session", "after unrelated turns")


def perplexity(model_dir: Path, adapter_dir: Path, text: str, window: int = 512) -> tuple[float, float]:
    """(bare backbone, backbone + adapter from a zero state with writes on) over `text` in windows."""
    import torch
    from transformers import AutoTokenizer

    from delta_mem_vllm.hf.model import DeltaMemModel

    tok = AutoTokenizer.from_pretrained(model_dir)
    dm = DeltaMemModel.from_pretrained(model_dir, adapter_dir)
    ids = tok(text, return_tensors="pt").input_ids[0]
    nll = {"bare": 0.0, "adapter": 0.0}
    count = 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window + 1].unsqueeze(0)
            if chunk.shape[1] < 2:
                break
            bare = dm.model(input_ids=chunk[:, :-1]).logits          # the hooks are inert outside dm calls
            ours = dm(chunk[:, :-1]).logits
            for name, logits in (("bare", bare), ("adapter", ours)):
                nll[name] += torch.nn.functional.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    return math.exp(nll["bare"] / count), math.exp(nll["adapter"] / count)


def null_adapter(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """A fresh adapter with `adapter_dir`'s configuration: zero output maps, so it changes nothing."""
    import torch
    from transformers import AutoModelForCausalLM

    from delta_mem_vllm.adapter import load_adapter, save_adapter
    from delta_mem_vllm.hf.model import DeltaMemModel

    config = load_adapter(adapter_dir).config
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return save_adapter(DeltaMemModel(model, config).adapter(), out)


def replies(server: Server, tokens: int, concurrency: int) -> dict[str, list[str]]:
    """Each prompt's reply without a session and after the unrelated turns (one session per prompt)."""
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)

    def one(item: tuple[int, str]) -> tuple[str, str]:
        i, prompt = item
        alone = ask(client, [{"role": "user", "content": prompt}], None, tokens)["text"]
        sid = f"general-{i}-{time.monotonic_ns()}"
        for turn in UNRELATED_TURNS:
            ask(client, [{"role": "user", "content": turn}], sid, tokens)
        return alone, ask(client, [{"role": "user", "content": prompt}], sid, tokens)["text"]

    with ThreadPoolExecutor(concurrency) as pool:
        pairs = list(pool.map(one, enumerate(PROMPTS)))
    return {ARMS[0]: [a.strip() for a, _ in pairs], ARMS[1]: [b.strip() for _, b in pairs]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, required=True)
    ap.add_argument("--engine", default="torch", help="comma-separated: torch, vllm")
    ap.add_argument("--dtype", default="float32", help="the servers' --dtype (replies are compared as text)")
    ap.add_argument("--tokens", type=int, default=32, help="reply length")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--write", metavar="LABEL", default=None, help="append the tables to bench/RESULTS-general.md")
    args = ap.parse_args()

    engines = args.engine.split(",")
    t0 = time.perf_counter()
    bare_ppl, ours_ppl = perplexity(args.model, args.adapter, PLAIN_TEXT.read_text()[:20000])
    print(f"perplexity: bare {bare_ppl:.2f}, adapter {ours_ppl:.2f}", flush=True)
    served: dict[tuple[str, str], dict[str, list[str]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        null = null_adapter(args.model, args.adapter, Path(tmp) / "null-adapter")
        for engine in engines:
            for side, adapter in (("bare", null), ("adapter", args.adapter)):
                server = Server(args.model, adapter, engine, Path(tmp) / f"{engine}-{side}.log",
                                extra=["--dtype", args.dtype])
                try:
                    served[engine, side] = replies(server, args.tokens, args.concurrency)
                finally:
                    server.stop()
                print(f"{engine} engine, {side}: {len(PROMPTS)} prompts × {len(ARMS)} arms "
                      f"[{time.perf_counter() - t0:.0f} s]", flush=True)

    n = len(PROMPTS)
    lines = [f"General ability of {args.adapter}: greedy {args.tokens}-token replies, "
             f"--dtype {args.dtype}; {(time.perf_counter() - t0) / 60:.1f} min.", "",
             f"Perplexity on {PLAIN_TEXT} (first 20,000 characters, 512-token windows): bare backbone "
             f"{bare_ppl:.2f}, with the adapter (zero state, writes on) {ours_ppl:.2f} "
             f"({100 * (ours_ppl / bare_ppl - 1):+.1f}%).", "",
             f"Replies identical to the bare backbone's ({n} prompts, bench/general-prompts.txt; the session arm "
             f"after {UNRELATED_TURNS}):", "", "| engine | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    for engine in engines:
        same = [sum(a == b for a, b in zip(served[engine, "bare"][arm], served[engine, "adapter"][arm])) for arm in ARMS]
        lines.append(f"| {engine} | " + " | ".join(f"{k}/{n} = {k / n:.0%}" for k in same) + " |")
    if len(engines) > 1:
        a, b = engines[:2]
        agree = [sum(x == y for x, y in zip(served[a, side][arm], served[b, side][arm]))
                 for side in ("bare", "adapter") for arm in ARMS]
        lines += ["", f"Engines agree ({a} vs {b}, same reply text): bare {agree[0]}/{n} and {agree[1]}/{n}, "
                  f"adapter {agree[2]}/{n} and {agree[3]}/{n} ({ARMS[0]}, {ARMS[1]})."]
    first = engines[0]
    lines += ["", f"First prompts ({first} engine):", "", "| prompt | bare backbone | adapter, no session | "
              "adapter, after unrelated turns |", "|---|---|---|---|"]
    for i, prompt in enumerate(PROMPTS[:8]):
        cells = [served[first, "bare"][ARMS[0]][i], *(served[first, "adapter"][arm][i] for arm in ARMS)]
        lines.append(f"| {prompt} | " + " | ".join(repr(c[:70]).replace("|", "\\|") for c in cells) + " |")
    report = "\n".join(lines)
    print(report)
    if args.write:
        machine = f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_name()}); engines {args.engine}"
        out = REPO / "bench" / "RESULTS-general.md"
        head = "" if out.exists() else ("# General-ability benchmark\n\nWhat an adapter changes where the memory has "
                                        "nothing to add (`bench/bench_general.py`).\n")
        with open(out, "a") as f:
            f.write(f"{head}\n## {args.write}\n\nMachine: {machine}. Command: `python bench/bench_general.py "
                    f"{' '.join(sys.argv[1:])}`\n\n{report}\n")
        print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
