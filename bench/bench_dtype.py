"""bf16 vs fp32 for `serve --demo` on this CPU, through vLLM's own benchmark client (`vllm bench serve`).

    python bench/bench_dtype.py [--input-len 1024 --output-len 128 --prompts 8 --concurrency 1 16] [--write]

Each dtype gets a fresh `delta-mem-vllm serve --demo --dtype D` (defaults otherwise: compiled, the KV
cache sized by the server), fp32 first; vLLM's client sends random prompts of a fixed length
to /v1/chat/completions (stateless, `ignore_eos` so every reply has the same length) at each
concurrency, and reports output tokens/s and time to first token. `--write` appends the table to
bench/RESULTS-vllm.md, naming the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text().split()
            native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores, bf16: {', '.join(native) or 'emulated'}"
    return platform.processor() or platform.machine()


def start(dtype: str, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--demo", "--dtype", dtype, "--port", str(port),
                             "--state-backend", "memory", "--log-level", "warning"],
                            cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"serve --demo --dtype {dtype} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc, time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def vllm_bench(port: int, model_dir: str, concurrency: int, args: argparse.Namespace) -> dict:
    """One run of vLLM's serving benchmark client against the server (in this process)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    ns = parser.parse_args([
        "--backend", "openai-chat", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/chat/completions",
        "--model", "delta-mem-demo", "--tokenizer", model_dir, "--dataset-name", "random",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
        "--num-prompts", str(max(args.prompts, concurrency)), "--max-concurrency", str(concurrency),
        "--ignore-eos", "--percentile-metrics", "ttft,tpot", "--disable-tqdm", "--seed", "0"])
    return main(ns)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    from delta_mem_vllm.pretrained import DEFAULT_CACHE, fetch_model

    model_dir = str(fetch_model("smollm2-135m-instruct", DEFAULT_CACHE))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in DTYPES:
            proc, ready_s = start(dtype, args.port, Path(tmp) / f"{dtype}.log")
            try:
                for conc in args.concurrency:
                    r = vllm_bench(args.port, model_dir, conc, args)
                    rows.append((dtype, conc, ready_s, r["output_throughput"], r["median_ttft_ms"], r["p99_ttft_ms"],
                                 r["median_tpot_ms"]))
                    print(f"{dtype} concurrency {conc}: {r['output_throughput']:.1f} output tok/s, "
                          f"TTFT median {r['median_ttft_ms']:.0f} ms, p99 {r['p99_ttft_ms']:.0f} ms, "
                          f"TPOT median {r['median_tpot_ms']:.1f} ms (ready after {ready_s:.0f} s)", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    table = ["| dtype | concurrency | output tok/s | TTFT median | TTFT p99 | TPOT median | start to ready |",
             "|---|---|---|---|---|---|---|"]
    for dtype, conc, ready_s, tput, ttft, ttft99, tpot in rows:
        table.append(f"| {dtype} | {conc} | {tput:.1f} | {ttft:.0f} ms | {ttft99:.0f} ms | {tpot:.1f} ms | {ready_s:.0f} s |")
    ratios = []
    for conc in args.concurrency:
        by = {d: t for d, c, _, t, *_ in rows if c == conc}
        ratios.append(f"bf16/fp32 at concurrency {conc}: {by['bfloat16'] / by['float32']:.2f}x")
    text = "\n".join(table) + "\n\n" + "; ".join(ratios) + "\n"
    print(text)
    if args.write:
        with (REPO / "bench" / "RESULTS-vllm.md").open("a") as f:
            f.write(f"\n## `serve --demo` in bf16 vs fp32 (bench/bench_dtype.py, {time.strftime('%Y-%m-%d')})\n\n"
                    f"CPU: {cpu_name()}. vLLM's own benchmark client (`vllm bench serve`, backend openai-chat), "
                    f"random prompts of {args.input_len} tokens, {args.output_len} output tokens (ignore_eos), "
                    f"stateless requests; each dtype on a fresh server with the defaults (compiled, KV cache "
                    f"sized by the server), one run.\n\n{text}")


if __name__ == "__main__":
    main()
