"""What a stop string costs a memory-mode turn on the vLLM engine.

vLLM runs a request ahead of the server's detokenizer until the abort lands, so the state it saves
covers tokens after the stop; the engine then recomputes the turn's state (a prefill of the whole
turn, context included) while the session stays locked. This measures that in one run: the same
memory-mode turn (read-only context of C tokens, a 32-token new message, 16 generated tokens) ended
by `max_tokens`, and ended at the same token by a stop string.

    python bench/bench_stop_replay.py [--contexts 512,2048] [--hidden 768 --layers 12] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from bench_vllm import build, ids, machine  # noqa: E402

NEW, GENERATED, REPEATS = 32, 16, 3


async def measure(engine, contexts: list[int]) -> list[dict[str, float]]:
    from server.engine.base import GenerationRequest, MemorySpec, SamplingParams

    state = torch.randn(engine.state_shape, generator=torch.Generator().manual_seed(1)) * 0.3

    async def turn(prompt: list[int], write_start: int, stop: tuple[str, ...], max_tokens: int):
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, stop=stop)
        req = GenerationRequest(f"t{time.perf_counter_ns()}", prompt, sampling,
                                MemorySpec(initial_state=state, write_start=write_start))
        t0, final, text = time.perf_counter(), None, ""
        async for out in engine.generate(req):
            final, text = (out if out.finished else final), text + out.text
        return time.perf_counter() - t0, final, text

    rows = []
    for c in contexts:
        prompt = ids(c, seed=c) + ids(NEW, seed=c + 1)
        _, _, full = await turn(prompt, c, (), GENERATED)
        # a stop string that first appears where the last generated token ends the text
        stop = next((full[-k:] for k in range(3, 12) if full.find(full[-k:]) == len(full) - k), None)
        if stop is None:
            print(f"context {c}: no stop string ends {full!r} first; skipped")
            continue
        by_length, by_stop, replays0 = [], [], engine.stop_replays
        for _ in range(REPEATS):   # alternated, so that both see the same machine
            by_length.append((await turn(prompt, c, (), GENERATED))[0])
            seconds, stopped, _ = await turn(prompt, c, (stop,), GENERATED + 32)
            by_stop.append(seconds)
        rows.append({"context": c, "length": statistics.median(by_length), "stop": statistics.median(by_stop),
                     "replays": engine.stop_replays - replays0, "tokens": stopped.completion_tokens})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS-vllm.md")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    from server.engine.vllm_engine import VllmEngine
    from server.settings import Settings

    root = Path(tempfile.gettempdir()) / f"deltamem-bench-vllm-{args.hidden}x{args.layers}-16384"
    model, adapter = build(root, args.hidden, args.layers)
    settings = Settings(model=str(model), adapter=str(adapter), dtype="float32", enforce_eager=True,
                        max_model_len=max(contexts) + 256, kv_cache_memory_bytes=1 << 30, max_num_seqs=8)
    engine = VllmEngine.from_settings(settings)

    async def run() -> list[dict[str, float]]:
        await engine.start()
        try:
            return await measure(engine, contexts)
        finally:
            await engine.stop()

    rows = asyncio.run(run())
    lines = [f"Machine: {machine()}. Model: random qwen3, hidden {args.hidden}, {args.layers} layers, fp32, "
             f"Δ-Mem on every layer; medians of {REPEATS}, alternated.", "",
             "| read-only context | turn ended by max_tokens (ms) | same turn ended by a stop string (ms) | extra | "
             "state recomputed |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['context']} tokens + {NEW}-token message, {r['tokens']} generated | {r['length'] * 1e3:.0f} | "
                     f"{r['stop'] * 1e3:.0f} | {(r['stop'] / r['length'] - 1) * 100:+.0f}% | {r['replays']} of {REPEATS} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        with (REPO / "bench" / "RESULTS-vllm.md").open("a") as f:
            f.write(f"\n## Stop-string turns (bench/bench_stop_replay.py, {time.strftime('%Y-%m-%d')})\n\n{text}\n")


if __name__ == "__main__":
    main()
