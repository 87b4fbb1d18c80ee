"""CPU benchmark: the chunked torch scan against the naive per-token loop (prints its figures).

    python bench/bench_scan.py [--tokens 512 4096 16384] [--heads 1 4] [--repeats 3]

One sequence (batch 1) with r = 8; h state heads are h independent scans, as in a Δ-Mem layer.
Reports the median (and minimum) wall time of each implementation and the median speed-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from delta_mem_vllm.ops.scan import scan_chunked, scan_reference


def inputs(n: int, T: int, R: int):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.tanh(torch.randn(n, T, R, generator=g)), dim=-1)
    k = F.normalize(torch.tanh(torch.randn(n, T, R, generator=g)), dim=-1)
    v = torch.randn(n, T, R, generator=g)
    beta = torch.sigmoid(torch.randn(n, T, R, generator=g) - 1.5)
    return torch.zeros(n, R, R), q, k, v, 1 - beta, beta, beta


def timings(fn, repeats: int) -> tuple[float, float]:
    """(median, min) seconds over `repeats` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 4096, 16384])
    ap.add_argument("--heads", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, r={args.rank}")
    print(f"{'tokens':>7} {'h':>2} {'naive ms (min)':>16} {'chunked ms (min)':>18} {'speed-up':>9} {'max |Δstate|':>13}")
    for T in args.tokens:
        for h in args.heads:
            x = inputs(h, T, args.rank)
            ref = scan_reference(*x)
            got = scan_chunked(*x)
            err = (ref[0] - got[0]).abs().max().item()
            naive, naive_min = timings(lambda: scan_reference(*x), args.repeats)
            fast, fast_min = timings(lambda: scan_chunked(*x), args.repeats)
            print(f"{T:>7} {h:>2} {naive * 1e3:>8.1f} ({naive_min * 1e3:>5.1f}) {fast * 1e3:>9.1f} ({fast_min * 1e3:>6.1f})"
                  f" {naive / fast:>8.1f}x {err:>13.2e}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
