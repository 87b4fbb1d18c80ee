"""CLI and settings: flags generated from the settings, env vars, engine choice, demo model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from delta_mem_vllm.state import FilesystemBackend
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
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--engine", "vllm", "--demo", "--demo-tiny", "--demo-dir",
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


def test_serve_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 8000)", "(default: filesystem)", "(default: off)", "(default: 1024)"):
        assert shown in text, shown


def test_startup_errors_are_one_line_each(tmp_path, capsys, monkeypatch):
    from server.demo import build_demo_model

    model, adapter = build_demo_model(tmp_path / "demo")
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    base = ["serve", "--model", str(model), "--adapter", str(adapter), "--engine", "torch"]
    cases = [
        (["serve", "--model", str(tmp_path / "missing"), "--adapter", str(adapter)], "--model", "no such directory"),
        ([*base, "--state-backend", "redis"], "--state-backend redis", "needs --redis-url"),
        ([*base, "--state-dir", str(tmp_path / "file")], "--state-dir", "not a directory"),
        ([*base, "--chat-template", str(tmp_path / "none.jinja")], "--chat-template", "neither a file nor"),
        ([*base, "--port", "99999"], "--port", "less than or equal to 65535"),
        ([*base, "--state-dir", str(tmp_path / "held")], "--state-dir", "in use by another server"),
        ([*base, "--max-sessions-per-owner", "0"], "--max-sessions-per-owner", "greater than or equal to 1"),
    ]
    held = FilesystemBackend(tmp_path / "held", exclusive=True)   # as a running server holds its directory
    monkeypatch.delenv("DELTAMEM_REDIS_URL", raising=False)
    for argv, flag, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("delta-mem-vllm: error: ") and flag in err and words in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    held.close()
