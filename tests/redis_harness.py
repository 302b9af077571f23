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

from connectors.ports import free_port

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
)


def require_redis_server() -> str:
    """The redis-server path, or skip the calling test/fixture (scripts/test.sh installs it)."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; scripts/test.sh does it)")
    return REDIS_SERVER


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
                 password: str | None = None, extra_args: list[str] | None = None) -> None:
        self.binary = require_redis_server()
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.password = password  # --requirepass: clients must AUTH (the URL carries it)
        self.extra_args = list(extra_args or [])  # e.g. ["--replicaof", "127.0.0.1", "6380"]
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
             *(["--requirepass", self.password] if self.password else []), *self.extra_args],
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

    def info(self, section: str = "replication") -> dict[str, str]:
        """``INFO <section>`` as a dict of strings."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            raw = _command(self._authed(s), "INFO", section).decode(errors="replace")
        return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line and not line.startswith("$"))

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


class SentinelCluster:
    """A primary, ``replicas`` replicas and ``sentinels`` sentinels (``redis-server sentinel.conf --sentinel``) on free
    loopback ports, with short failure timeouts so a failover takes a few seconds. ``.url`` is the stores URL
    (``redis+sentinel://...``); ``.servers`` are the data servers in start order (the first is the first primary)."""

    def __init__(self, directory: Path, *, service: str = "kr-test", replicas: int = 1, sentinels: int = 3,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000) -> None:
        self.dir = Path(directory)
        self.service = service
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.n_replicas, self.n_sentinels = replicas, sentinels
        self.servers: list[RedisServer] = []
        self.sentinel_ports: list[int] = []
        self.sentinel_procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/0?socket_timeout=3"

    def _data_server(self, name: str, primary_port: int | None) -> RedisServer:
        extra = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        if primary_port is not None:
            extra += ["--replicaof", "127.0.0.1", str(primary_port)]
        return RedisServer(self.dir / name, extra_args=extra)

    def start(self) -> None:
        primary = self._data_server("primary", None)
        primary.start()
        self.servers.append(primary)
        for i in range(self.n_replicas):
            replica = self._data_server(f"replica{i}", primary.port)
            replica.start()
            self.servers.append(replica)
        self.wait_replicas(self.n_replicas)
        binary = require_redis_server()
        for i in range(self.n_sentinels):
            port = free_port()
            d = self.dir / f"sentinel{i}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"  # sentinel rewrites its own config: it must be a writable file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {d}\n"
                f"sentinel resolve-hostnames no\n"
                f"sentinel monitor {self.service} 127.0.0.1 {primary.port} {self.n_sentinels // 2 + 1}\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} 1\n")
            log = open(d / "sentinel.log", "ab")
            self.sentinel_procs.append(subprocess.Popen([binary, str(conf), "--sentinel"], stdout=log,
                                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            log.close()
            self.sentinel_ports.append(port)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # every sentinel sees the primary, its replicas and the other sentinels
            with contextlib.suppress(OSError, ValueError):
                if all(self._sentinel_ready(p) for p in self.sentinel_ports):
                    return
            time.sleep(0.1)
        raise RuntimeError("the sentinels did not discover each other within 15 s")

    def _sentinel_ready(self, port: int) -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            raw = _command(s, "SENTINEL", "MASTER", self.service).decode(errors="replace")
        values = [x for x in raw.split("\r\n") if x and not x.startswith(("*", "$"))]
        fields = dict(zip(values[::2], values[1::2]))
        return (int(fields.get("num-slaves", 0)) >= self.n_replicas
                and int(fields.get("num-other-sentinels", 0)) >= self.n_sentinels - 1)

    def primary_port(self) -> int:
        """The primary the sentinels name now (asks the first sentinel that answers)."""
        for port in self.sentinel_ports:
            with contextlib.suppress(OSError, ValueError):
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    raw = _command(s, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service).decode()
                values = [x for x in raw.split("\r\n") if x and not x.startswith(("*", "$"))]
                return int(values[1])
        raise RuntimeError("no sentinel answered")

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def wait_primary_change(self, old_port: int, timeout_s: float = 30.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            port = self.primary_port()
            if port != old_port:
                return port
            time.sleep(0.05)
        raise AssertionError(f"no failover within {timeout_s} s")

    def wait_replicas(self, n: int, timeout_s: float = 20.0) -> None:
        """Until the current primary (by the first server that is one) has ``n`` replicas online and in sync."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for server in self.servers:
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    info = server.info("replication")
                    if info.get("role") == "master":
                        online = [v for k, v in info.items() if k.startswith("slave") and "state=online" in v]
                        if len(online) >= n:
                            return
            time.sleep(0.05)
        raise AssertionError(f"the primary did not get {n} online replica(s) within {timeout_s} s")

    def replace(self, dead: RedisServer) -> RedisServer:
        """A new empty server (new port, as a rescheduled pod gets a new address), started as a replica of the current primary (what a
        restarted pod's start-up script does: ask the sentinels, then REPLICAOF)."""
        fresh = self._data_server(dead.dir.name + "-new", self.primary_port())
        fresh.start()
        self.servers[self.servers.index(dead)] = fresh
        return fresh

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGCONT)  # a frozen (SIGSTOP) server: let it go before the kill
            server.stop(kill=True)


@contextlib.contextmanager
def sentinel_cluster(tmp_dir: Path, **kwargs: object) -> Iterator[SentinelCluster]:
    """Start a primary + replica(s) + sentinels in ``tmp_dir``; all stopped on exit."""
    cluster = SentinelCluster(tmp_dir, **kwargs)  # type: ignore[arg-type]
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
