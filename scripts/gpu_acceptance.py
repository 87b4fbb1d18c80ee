"""GPU acceptance: what a CPU cannot check, in one device call of at most 10 minutes.

CPUs run the V1 model runner eagerly, without Triton or async scheduling; this run covers the rest
on a lent GPU (an H200 with torch 2.11 and no network, so vLLM 0.26 arrives as an offline bundle in
.gpu-bundle/: part-NN files, SHA256SUMS and install-bundle.sh, built on a machine with PyPI access):

    # first, beside the bundle (git ignores .gpu-bundle):
    scripts/make-gpu-extras.sh .gpu-bundle       # pytest and what the bundle lacks for us
    # call 1 carries the first part (carry [".gpu-bundle/part-00"]; a call carries at most 64 MiB):
    mkdir -p /tmp/gpu-bundle && cp .gpu-bundle/part-00 /tmp/gpu-bundle/
    # call 2, at once (carry the other files of .gpu-bundle): install, then run this with a budget
    # that leaves the call time to write its report
    cp .gpu-bundle/part-01 .gpu-bundle/SHA256SUMS /tmp/gpu-bundle/ && bash .gpu-bundle/install-bundle.sh \\
      && mkdir -p /tmp/extras && tar -C /tmp/extras -xf .gpu-bundle/extras.tar \\
      && python3 -m pip install -q --no-deps --no-index --target /tmp/site /tmp/extras/*.whl \\
      && export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 \\
      && python3 scripts/gpu_acceptance.py --budget 480

Phases, most valuable first; each gets at most what is left of the budget (one that cannot start
in time is recorded as not run, one cut short as timed out):
1. the device, the versions, and every module the run imports (a missing one is named at once);
2. the Triton scan kernel against the naive reference (tests/test_varlen_scan.py on CUDA);
3. the vLLM engine against the reference model, per model runner (V1, V2) and CUDA graphs (off, on):
   batched requests with chunked prefill, preemption, stop strings (also when the abort finds the
   request preempted), a turn ending on EOS (async scheduling must not count it as written), then
   the HTTP engine-agreement script on qwen3;
4. bench/bench_vllm.py on a random 1B-class Qwen3 (hidden 2048, 16 layers) in bf16: plain vs
   Δ-Mem, decode at batch 1/16/64, time to first token, a memory-mode turn after 8k and 32k tokens
   of history.
The report goes to bench/RESULTS-gpu-acceptance.md (device named) and, with the logs, to $OUT.
`--dry-run` checks all of it that a CPU can: the plan, the test selections (collected), and that
every part of the bundle fits a call beside the working tree.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT = 64 << 20          # what one device call carries: the working tree and the carried paths
ENGINE_TESTS = ("tests/server/test_vllm_engine.py::test_batched_requests_match_the_reference[qwen3] "
                "tests/server/test_vllm_engine.py::test_slot_reuse_and_preemption "
                "tests/server/test_vllm_engine.py::test_stop_string_turns_under_preemption_commit_exactly_what_was_shown "
                "tests/server/test_vllm_engine.py::test_a_stop_abort_that_found_the_request_preempted_is_replayed "
                "tests/server/test_vllm_engine.py::test_a_turn_that_ends_on_eos_leaves_it_pending "
                "tests/server/test_engines_agree.py::test_engines_agree_over_http[qwen3]").split()
KERNEL_TESTS = ["tests/test_varlen_scan.py"]
NEEDED = ("torch", "triton", "vllm", "transformers", "safetensors", "pydantic_settings", "fastapi", "uvicorn",
          "xgrammar", "openai", "httpx", "pytest", "jsonschema", "delta_mem_vllm", "server")
BENCH = ["bench/bench_vllm.py", "--hidden", "2048", "--layers", "16", "--dtype", "bfloat16", "--histories",
         "8192,32768", "--rounds", "1", "--no-embedded"]


@dataclass
class Phase:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    estimate: float = 60.0       # seconds it needs to be worth starting
    outcome: str = "not run"
    seconds: float = 0.0
    tail: str = ""


def plan(bench_results: Path) -> list[Phase]:
    py = sys.executable
    phases = [Phase("Triton scan kernel vs the naive reference", [py, "-m", "pytest", "-q", *KERNEL_TESTS],
                    estimate=30)]
    for runner in ("0", "1"):
        for graphs in ("0", "1"):
            name = f"vLLM engine vs reference: {'V2' if runner == '1' else 'V1'} runner, CUDA graphs {'on' if graphs == '1' else 'off'}"
            phases.append(Phase(name, [py, "-m", "pytest", "-q", "-x", *ENGINE_TESTS],
                                {"VLLM_USE_V2_MODEL_RUNNER": runner, "DELTAMEM_TEST_CUDAGRAPHS": graphs,
                                 "DELTAMEM_REQUIRE_VLLM": "1"}, estimate=90))
    phases.append(Phase("bench_vllm: plain vs Δ-Mem (random 1B-class Qwen3, bf16)",
                        [py, *BENCH, "--write", "--results", str(bench_results)], estimate=150))
    return phases


def device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    props = torch.cuda.get_device_properties(0)
    return f"{torch.cuda.get_device_name()} ({props.total_memory / 2**30:.0f} GiB), CUDA capability {props.major}.{props.minor}"


def versions() -> str:
    import importlib.metadata as md

    found = []
    for name in ("torch", "triton", "vllm", "transformers"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} absent")
    return ", ".join(found)


def missing_modules() -> list[str]:
    import importlib.util

    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def run(phases: list[Phase], budget: float, logs: Path | None) -> None:
    deadline = time.monotonic() + budget
    for phase in phases:
        left = deadline - time.monotonic()
        if left < phase.estimate:
            phase.outcome = f"not run (budget: {max(left, 0):.0f} s left, needs about {phase.estimate:.0f} s)"
            continue
        print(f"== {phase.name} ({left:.0f} s left)", flush=True)
        t0 = time.monotonic()
        try:
            done = subprocess.run(phase.command, cwd=REPO, env={**os.environ, **phase.env}, capture_output=True,
                                  text=True, timeout=left)
            phase.outcome = "passed" if done.returncode == 0 else f"failed (exit {done.returncode})"
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            phase.outcome = "timed out (budget)"
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        phase.seconds = time.monotonic() - t0
        phase.tail = "\n".join(output.strip().splitlines()[-15:])
        print(f"   {phase.outcome} in {phase.seconds:.0f} s\n{phase.tail}", flush=True)
        if logs is not None:
            (logs / f"{len(list(logs.glob('*.log'))):02d}.log").write_text(f"{phase.name}\n{phase.env}\n\n{output}")


def report(phases: list[Phase], header: list[str]) -> str:
    rows = ["| phase | outcome | seconds |", "|---|---|---|"]
    rows += [f"| {p.name} | {p.outcome} | {p.seconds:.0f} |" for p in phases]
    tails = [f"### {p.name}\n\n```text\n{p.tail}\n```" for p in phases if p.tail and not p.outcome.startswith("passed")]
    return "\n".join(header + [""] + rows + [""] + tails) + "\n"


def dry_run(phases: list[Phase], bundle: Path) -> int:
    """What a CPU can check: the plan, that every selected test exists, that each bundle part fits a
    call beside the working tree. Returns the exit status."""
    problems = []
    for phase in phases:
        env = " ".join(f"{k}={v}" for k, v in phase.env.items())
        command = " ".join("python" if c == sys.executable else c for c in phase.command)
        print(f"- {phase.name} (about {phase.estimate:.0f} s): {env} {command}".replace(":  ", ": "))
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *ENGINE_TESTS, *KERNEL_TESTS],
                               cwd=REPO, capture_output=True, text=True)
    if collected.returncode != 0:
        problems.append("the selected tests do not all exist:\n" + collected.stdout[-2000:] + collected.stderr[-2000:])
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((REPO / f.decode()).stat().st_size for f in tracked if f and (REPO / f.decode()).is_file())
    parts = sorted(bundle.glob("part-*"))
    if not parts:
        problems.append(f"no bundle parts in {bundle}: put the offline vLLM bundle's part-NN files there")
    if not (bundle / "extras.tar").is_file():
        problems.append(f"no {bundle / 'extras.tar'} (build it: scripts/make-gpu-extras.sh {bundle})")
    calls = [[p] for p in parts[:-1]] + [parts[-1:] + [f for f in bundle.iterdir() if not f.name.startswith("part-")]]
    for i, files in enumerate(calls if parts else [], 1):   # the last call carries the rest of the bundle
        size = sum(f.stat().st_size for f in files)
        fits = tree + size <= CARRY_LIMIT
        print(f"  call {i}: {', '.join(f.name for f in files)}: {size / 2**20:.1f} MiB + working tree "
              f"{tree / 2**20:.1f} MiB {'fits' if fits else 'DOES NOT FIT'} the {CARRY_LIMIT >> 20} MiB a call carries")
        if not fits:
            problems.append(f"call {i} does not fit")
    for p in problems:
        print(f"problem: {p}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all phases (a call may run 600)")
    ap.add_argument("--report", type=Path, default=REPO / "bench" / "RESULTS-gpu-acceptance.md")
    ap.add_argument("--bundle", type=Path, default=REPO / ".gpu-bundle", help="the vLLM bundle's parts (dry run)")
    ap.add_argument("--dry-run", action="store_true", help="check the plan, the tests and the bundle on a CPU")
    args = ap.parse_args(argv)
    phases = plan(args.report.with_name("RESULTS-gpu-bench.md"))
    if args.dry_run:
        return dry_run(phases, args.bundle)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    started = time.strftime("%Y-%m-%d %H:%M")
    missing = missing_modules()
    header = ["# GPU acceptance (scripts/gpu_acceptance.py)", "",
              f"Run {started} on {device()}; {versions()}; budget {args.budget:.0f} s.",
              f"Modules missing: {', '.join(missing) if missing else 'none'}.",
              "Benchmark figures: bench/RESULTS-gpu-bench.md (when its phase ran)."]
    print("\n".join(header), flush=True)
    run(phases, args.budget, out)
    text = report(phases, header)
    args.report.write_text(text)
    if out is not None:
        (out / args.report.name).write_text(text)
        bench = args.report.with_name("RESULTS-gpu-bench.md")
        if bench.is_file():
            (out / bench.name).write_text(bench.read_text())
    print(text)
    return 0 if all(p.outcome == "passed" for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
