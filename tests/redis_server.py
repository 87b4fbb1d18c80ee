"""Start a real, throw-away ``redis-server`` on a free loopback port (test helper, not a fixture file).

Usage from a test module::

    from redis_server import RedisServer, redis_server_binary
    srv = RedisServer(tmp_path).start(); ...; srv.stop()

No persistence (``--save '' --appendonly no``) unless ``durable=True`` (AOF with ``appendfsync
always``: what a restart must not lose), bound to 127.0.0.1, data dir inside ``tmp_path``.
``stop()`` then ``start()`` restarts it on the same port with the same data.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, workdir: str | Path, durable: bool = False) -> None:
        self.workdir = Path(workdir)
        self.durable = durable
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server binary not found")
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_err = ""
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        for _ in range(3):  # the free port may be taken between probe and bind: retry
            port = self.port or _free_port()   # a restart keeps its port
            log = self.workdir / f"redis-{port}.log"
            proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", *persistence,
                 "--dir", str(self.workdir), "--daemonize", "no", "--logfile", str(log)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None:
                if _can_connect(port):
                    self.port, self.proc = port, proc
                    return self
                time.sleep(0.02)
            proc.kill()
            proc.wait()
            last_err = log.read_text(errors="replace")[-500:] if log.exists() else ""
        raise RuntimeError(f"redis-server did not start: {last_err}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
