"""A real ``redis-server`` on a free loopback port for tests, with AOF so a restart replays the data.

Why a real server: the stores rely on Lua scripts, streams, ``XREAD BLOCK``, key expiry and surviving a
restart; a fake would test the fake. ``redis_server(tmp)`` is a context manager; ``.stop(kill=True)`` is a
crash (SIGKILL), ``.start()`` brings it back on the same port and directory.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
)


def require_redis_server() -> str:
    """The redis-server path, or skip the calling test/fixture (scripts/test.sh installs it)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; scripts/test.sh does it)")
    return REDIS_SERVER


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(sock: socket.socket, *args: str) -> bytes:
    """Send one command (RESP) and return the raw reply, enough for PING / INFO."""
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    sock.sendall(payload.encode())
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        if data.startswith(b"$"):  # bulk string: read until its full length arrived
            header, _, rest = data.partition(b"\r\n")
            if int(header[1:]) < 0 or len(rest) >= int(header[1:]) + 2:
                return data
        elif data.endswith(b"\r\n"):
            return data


class RedisServer:
    """One redis-server process: ``.url``, ``.port``, ``.start()``, ``.stop(kill=False)``."""

    def __init__(self, directory: Path, port: int | None = None, appendfsync: str = "always",
                 password: str | None = None) -> None:
        self.binary = require_redis_server()
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.appendfsync = appendfsync
        self.password = password  # --requirepass: clients must AUTH (the URL carries it)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _authed(self, sock: socket.socket) -> socket.socket:
        if self.password:
            _command(sock, "AUTH", self.password)
        return sock

    def start(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", self.appendfsync, "--dir", str(self.dir), "--protected-mode", "no",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir / 'redis.log'}")
            with contextlib.suppress(OSError):
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if _command(self._authed(s), "PING").startswith(b"+PONG"):
                        return
            time.sleep(0.02)
        self.stop(kill=True)
        raise RuntimeError(f"redis-server did not answer PING within {timeout_s} s")

    def stop(self, kill: bool = False, timeout_s: float = 10.0) -> None:
        """SIGTERM (graceful: flushes the AOF) or SIGKILL (a crash); waits for the process to be gone."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def info_commandstats(self) -> dict[str, dict[str, float]]:
        """``INFO commandstats`` as ``{"cmdstat_get": {"calls": 3, "usec": 12, ...}, ...}``."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            raw = _command(self._authed(s), "INFO", "commandstats").decode()
        out: dict[str, dict[str, float]] = {}
        for line in raw.splitlines():
            if line.startswith("cmdstat_"):
                name, _, values = line.partition(":")
                out[name] = {k: float(v) for k, v in (kv.split("=") for kv in values.split(","))}
        return out

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(kill=True)


@contextlib.contextmanager
def redis_server(tmp_dir: Path, port: int | None = None, appendfsync: str = "always",
                 password: str | None = None) -> Iterator[RedisServer]:
    """Start a redis-server in ``tmp_dir``; always stopped on exit."""
    server = RedisServer(tmp_dir, port, appendfsync, password)
    try:
        server.start()
        yield server
    finally:
        server.stop(kill=True)
