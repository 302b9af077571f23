"""A private virtual X display (Xvfb) for tests and headless desktop hosts.

Why ``-displayfd``: Xvfb picks a free display number itself and tells us, so parallel runs never race on a
guessed ``:N`` or on stale lock files.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import tempfile
import time
from types import TracebackType
from typing import IO


class XvfbError(RuntimeError):
    """Xvfb is missing or did not start."""


class VirtualDisplay:
    """``with VirtualDisplay(1024, 768) as vd: ... vd.display  # ":N"``. Stopped by PID on exit."""

    def __init__(self, width: int = 1024, height: int = 768, *, depth: int = 24, start_timeout_s: float = 15.0,
                 xvfb: str = "Xvfb") -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"bad screen size {width}x{height}")
        self.width, self.height, self.depth = width, height, depth
        self._start_timeout_s = start_timeout_s
        self._xvfb = xvfb
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.display: str = ""

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self) -> "VirtualDisplay":
        if self._proc is not None:
            return self
        binary = shutil.which(self._xvfb)
        if binary is None:
            raise XvfbError(f"{self._xvfb!r} not found on PATH: install it (Debian/Ubuntu: apt-get install xvfb)")
        read_fd, write_fd = os.pipe()
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: a chatty Xvfb must never block on stderr
        try:
            self._proc = subprocess.Popen(
                [binary, "-displayfd", str(write_fd), "-screen", "0", f"{self.width}x{self.height}x{self.depth}",
                 "-nolisten", "tcp", "-noreset"],
                pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._log)
        finally:
            os.close(write_fd)
        try:
            number = self._read_display_number(read_fd)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(read_fd)
        self.display = f":{number}"
        return self

    def _read_display_number(self, fd: int) -> int:
        """Xvfb writes ``N\\n`` once it accepts connections; EOF means it died."""
        deadline = time.monotonic() + self._start_timeout_s
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise XvfbError(f"Xvfb did not report a display within {self._start_timeout_s:g}s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 64)
            if not chunk:
                raise XvfbError(f"Xvfb exited before it was ready: {self._stderr_tail()}")
            data += chunk
        return int(data.strip())

    def _stderr_tail(self) -> str:
        if self._proc is None or self._log is None:
            return ""
        try:
            self._proc.wait(timeout=2)
            self._log.seek(0)
            return self._log.read().decode(errors="replace")[-500:].strip()
        except (subprocess.TimeoutExpired, OSError, ValueError):
            return ""

    def close(self) -> None:
        """Terminate, then kill, the Xvfb process we started (by PID, never by name)."""
        proc, self._proc = self._proc, None
        log, self._log = self._log, None
        if log is not None:
            log.close()
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def env(self) -> dict[str, str]:
        """A copy of ``os.environ`` with ``DISPLAY`` pointing here (for child processes)."""
        if not self.display:
            raise XvfbError("the virtual display is not started")
        env = dict(os.environ)
        env["DISPLAY"] = self.display
        return env

    def __enter__(self) -> "VirtualDisplay":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten display must not outlive the process
        try:
            self.close()
        except Exception:
            pass
