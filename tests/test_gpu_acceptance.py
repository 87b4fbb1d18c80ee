"""scripts/gpu_acceptance.py as far as a CPU can run it: its test selections exist, and phases are
run, cut short or skipped by the budget and all reported."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", REPO / "scripts" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_its_test_selections_exist():
    acceptance = load()
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *acceptance.ENGINE_TESTS,
                        *acceptance.KERNEL_TESTS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_the_budget_runs_cuts_and_skips_phases_and_every_one_is_reported(tmp_path):
    acceptance = load()
    phases = [acceptance.Phase("quick", [sys.executable, "-c", "print('ok')"], estimate=1),
              acceptance.Phase("failing", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], estimate=1),
              acceptance.Phase("cut", [sys.executable, "-c", "import time; time.sleep(60)"], estimate=1),
              acceptance.Phase("too big", [sys.executable, "-c", "print('never')"], estimate=1000)]
    acceptance.run(phases, budget=8, logs=tmp_path)
    assert [p.outcome.split(" (")[0] for p in phases] == ["passed", "failed", "timed out", "not run"]
    assert len(list(tmp_path.glob("*.log"))) == 3
    text = acceptance.report(phases, ["# GPU acceptance"])
    for p in phases:
        assert f"| {p.name} | {p.outcome} |" in text
    assert "### failing" in text and "### quick" not in text
