"""CLI and settings: flags generated from the settings, env vars, engine choice, demo model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser, main, settings_from_args

REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str):
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_flags_env_and_precedence(monkeypatch):
    monkeypatch.setenv("DELTAMEM_PORT", "1234")
    monkeypatch.setenv("DELTAMEM_API_KEYS", "a, b")
    monkeypatch.setenv("DELTAMEM_STATE_BACKEND", "redis")
    s = parse("--model", "m", "--no-auto-create-sessions", "--session-ttl", "60")
    assert s.port == 1234 and s.api_keys == ["a", "b"] and s.state_backend == "redis"
    assert s.model == "m" and s.auto_create_sessions is False and s.session_ttl == 60
    s = parse("--port", "99", "--api-keys", "k1", "k2", "--engine", "torch", "--state-dir", "/tmp/x")
    assert s.port == 99 and s.api_keys == ["k1", "k2"] and s.engine == "torch" and s.state_dir == Path("/tmp/x")
    with pytest.raises(SystemExit):
        parse("--engine", "tensorrt")


def test_engine_refusals_are_one_clear_line(tmp_path):
    """Startup errors name the problem and exit 2, without a traceback (engine choice: see
    tests/test_vllm_plugin_logic.py)."""
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--engine", "vllm", "--demo", "--demo-dir",
                        str(tmp_path / "demo"), "--enable-prefix-caching"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "prefix caching cannot be used with Δ-Mem" in r.stderr and "Traceback" not in r.stderr


def test_demo_model_command(tmp_path, capsys):
    assert main(["demo-model", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "serve --model" in out
    assert (tmp_path / "demo" / "model" / "config.json").is_file()
    assert (tmp_path / "demo" / "adapter" / "delta_mem_config.json").is_file()
