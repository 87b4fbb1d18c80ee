"""Embedded-engine benchmark: decode throughput with Δ-Mem vs the same model without it (same
TorchEngine loop), TTFT, and the cost of a session save/restore through the filesystem tier.

    python bench/bench_engine.py [--hidden 512 --layers 8 --tokens 128 --repeats 3] [--write]

The model is a random Qwen3-style checkpoint built offline by the tiny factory with config
overrides (default hidden 512, 8 layers), with a random rank-8 q/o adapter on every layer.
`--write` stores the table in bench/RESULTS-engine.md (only figures from this run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from delta_mem_vllm.hf import DeltaMemModel  # noqa: E402
from delta_mem_vllm.state import FilesystemBackend, Snapshot, TieredStateStore, storage_key  # noqa: E402
from delta_mem_vllm.testing.adapters import save_random_adapter  # noqa: E402
from delta_mem_vllm.testing.tiny import save_tiny_checkpoint  # noqa: E402
from server.engine.base import GenerationRequest, MemorySpec, SamplingParams  # noqa: E402
from server.engine.torch_engine import TorchEngine  # noqa: E402


@dataclass
class _PlainOut:
    logits: torch.Tensor
    state: torch.Tensor
    past_key_values: Any


class PlainModel:
    """The backbone alone behind DeltaMemModel's call signature: the baseline runs the very same
    engine loop, only without the memory step and the q/o corrections."""

    def __init__(self, dm: DeltaMemModel) -> None:
        dm.detach_hooks()
        self.model, self.config = dm.model, dm.config
        self.layer_names, self.state_shape = dm.layer_names, dm.state_shape
        self.adapter_fingerprint, self.device = dm.adapter_fingerprint, dm.device
        self.supports_logits_to_keep = dm.supports_logits_to_keep
        self._zero = dm.zero_state
        self._kw = dm._cache_kwarg

    def zero_state(self, batch: int | None = None) -> torch.Tensor:
        return self._zero(batch)

    def __call__(self, input_ids, attention_mask=None, state=None, past_key_values=None, use_cache=False,
                 logits_to_keep=0, **_: Any) -> _PlainOut:
        position_ids = None
        if attention_mask is not None:   # batched decode: left-padded rows, positions from the mask
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -input_ids.shape[1]:]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, logits_to_keep=logits_to_keep, **{self._kw: past_key_values})
        return _PlainOut(out.logits, state, getattr(out, self._kw, None))


def build(root: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    model_dir, adapter_dir = root / "model", root / "adapter"
    heads = max(1, hidden // 64)
    save_tiny_checkpoint(model_dir, arch="qwen3", seed=0, hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         head_dim=64)
    save_random_adapter(model_dir, adapter_dir, seed=0)
    return model_dir, adapter_dir


def make_engine(model_dir: Path, adapter_dir: Path, delta: bool) -> TorchEngine:
    from transformers import AutoTokenizer

    dm = DeltaMemModel.from_pretrained(model_dir, adapter_dir, attn_implementation="sdpa")
    backend = dm if delta else PlainModel(dm)
    return TorchEngine(backend, AutoTokenizer.from_pretrained(model_dir), model_name="bench", prefill_chunk=512)


async def run_batch(engine: TorchEngine, sessions: int, prompt_len: int, tokens: int) -> dict[str, float]:
    """`sessions` concurrent requests (distinct initial states); aggregate decode tok/s and TTFT."""
    g = torch.Generator().manual_seed(0)
    firsts: list[float] = []
    t_first_any: list[float] = []

    async def one(i: int) -> int:
        prompt = torch.randint(0, 250, (prompt_len,), generator=g).tolist()
        init = torch.randn(engine.state_shape, generator=g) * 0.1
        req = GenerationRequest(f"b{i}", prompt, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
                                MemorySpec(init, write_start=0))
        t0 = time.perf_counter()
        n = 0
        async for out in engine.generate(req):
            if out.token_ids and n == 0:
                firsts.append(time.perf_counter() - t0)
                t_first_any.append(time.perf_counter())
            n += len(out.token_ids)
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(sessions)))
    end = time.perf_counter()
    # decode phase: from the moment every request has its first token to the end
    decode_start = max(t_first_any)
    decoded = sum(c - 1 for c in counts)
    return {"tok_s": decoded / (end - decode_start) if end > decode_start else float("nan"),
            "wall_tok_s": sum(counts) / (end - start), "ttft_ms": 1000 * statistics.median(firsts)}


async def measure(engines: dict[str, TorchEngine], sessions: int, prompt_len: int, tokens: int,
                  repeats: int) -> dict[str, dict[str, float]]:
    """Alternate plain / Δ-Mem runs (same engine loop) so drift on a shared machine hits both alike."""
    for e in engines.values():
        await e.start()
    try:
        for e in engines.values():
            await run_batch(e, sessions, prompt_len, 8)  # warm-up
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
        for _ in range(repeats):
            for name, e in engines.items():
                runs[name].append(await run_batch(e, sessions, prompt_len, tokens))
    finally:
        for e in engines.values():
            await e.stop()
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def restore_cost(engine: TorchEngine, n: int = 200) -> dict[str, float]:
    """Save and restore one session state through a TieredStateStore whose memory tiers hold nothing,
    so every get is a restore from the filesystem (read + checksum + decode)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = TieredStateStore(FilesystemBackend(tmp), device="cpu", device_capacity=0, host_capacity=0,
                                 expect_adapter_fingerprint=engine.adapter_fingerprint,
                                 expect_shape=engine.state_shape, expect_layer_names=engine.layer_names)
        key = storage_key("", "bench")
        record = {"session_id": "bench", "owner": "", "pending_token_ids": [1], "message_log": ["x"] * 16}
        puts, gets = [], []
        for i in range(n):
            snap = Snapshot(torch.randn(engine.state_shape), record, engine.adapter_fingerprint, engine.layer_names)
            t0 = time.perf_counter()
            store.put(key, snap)
            t1 = time.perf_counter()
            assert store.get(key) is not None
            t2 = time.perf_counter()
            puts.append(t1 - t0)
            gets.append(t2 - t1)
        assert store.stats()["restores"] == n
        nbytes = engine.zero_state().numel() * 4
    return {"save_ms": 1000 * statistics.median(puts), "restore_ms": 1000 * statistics.median(gets),
            "state_bytes": nbytes}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens per request in the decode runs")
    ap.add_argument("--ttft-prompt", type=int, default=512, help="prompt tokens for the TTFT run")
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--write", action="store_true", help="write bench/RESULTS-engine.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapter_dir = build(Path(tmp), args.hidden, args.layers)
        engines = {"plain": make_engine(model_dir, adapter_dir, False), "delta": make_engine(model_dir, adapter_dir, True)}
        rows: list[tuple[str, dict[str, float], dict[str, float]]] = []
        for sessions in (1, 8):
            res = asyncio.run(measure(engines, sessions, args.prompt, args.tokens, args.repeats))
            rows.append((f"decode, {sessions} session(s)", res["plain"], res["delta"]))
        ttft = asyncio.run(measure(engines, 1, args.ttft_prompt, 2, args.repeats))
        restore = restore_cost(engines["delta"])
        params = sum(p.numel() for p in engines["delta"].dm.model.parameters())
        l, h, r, _ = engines["delta"].state_shape

    lines = [
        f"model: random qwen3, hidden {args.hidden}, {args.layers} layers, {params / 1e6:.1f}M params, fp32, sdpa; "
        f"Δ-Mem rank {r}, {h} state head(s), q/o heads, {l} layers",
        f"machine: {cpu_name()} ({os.cpu_count()} CPUs visible), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.prompt}-token prompts, {args.tokens} generated tokens, "
        f"median of {args.repeats}",
        "",
        "| measurement | plain | Δ-Mem | Δ-Mem / plain |",
        "|---|---|---|---|",
    ]
    for label, plain, delta in rows:
        lines.append(f"| {label}: aggregate decode tok/s | {plain['tok_s']:.1f} | {delta['tok_s']:.1f} | "
                     f"{delta['tok_s'] / plain['tok_s']:.2f}× |")
    lines.append(f"| TTFT, {args.ttft_prompt}-token prompt (ms) | {ttft['plain']['ttft_ms']:.1f} | "
                 f"{ttft['delta']['ttft_ms']:.1f} | {ttft['delta']['ttft_ms'] / ttft['plain']['ttft_ms']:.2f}× |")
    lines.append(f"| session save, filesystem tier, fsync (ms) | – | {restore['save_ms']:.3f} | |")
    lines.append(f"| session restore, filesystem tier (ms) | – | {restore['restore_ms']:.3f} | |")
    lines.append(f"| state size per session (bytes) | – | {restore['state_bytes']} | |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        out = Path(__file__).with_name("RESULTS-engine.md")
        out.write_text("# Embedded engine benchmark (bench/bench_engine.py)\n\n"
                       f"Run on {time.strftime('%Y-%m-%d')} with `python bench/bench_engine.py "
                       f"{' '.join(sys.argv[1:])}`.\n\n{table}\n")
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
