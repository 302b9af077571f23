"""Start the Tk test app on a display and wait until it has laid itself out (its state file says ``ready``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def read_state(path: str | Path) -> dict[str, Any]:
    """The app's last state; ``{}`` while it has not written one yet."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}


def wait_state(path: str | Path, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 5.0,
               interval_s: float = 0.02) -> dict[str, Any]:
    """Poll the state file until ``predicate`` holds; ``TimeoutError`` with the last state otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = read_state(path)
        if state and predicate(state):
            return state
        if time.monotonic() >= deadline:
            raise TimeoutError(f"app state did not reach the expected condition in {timeout_s:g}s: {state}")
        time.sleep(interval_s)


def launch_app(display_env: Mapping[str, str], state_path: str | Path, *, x: int = 0, y: int = 0,
               save_path: str | Path | None = None, timeout_s: float = 20.0) -> subprocess.Popen[bytes]:
    """Start the Tk app (``desktop_app.py``) with ``display_env`` (needs ``DISPLAY``); returns once ready."""
    state_path = Path(state_path)
    state_path.unlink(missing_ok=True)
    # By file path, not ``-m``: the app is stdlib-only, and importing the ``agents`` package costs a second.
    cmd = [sys.executable, str(Path(__file__).with_name("desktop_app.py")), "--state", str(state_path),
           "--x", str(x), "--y", str(y)]
    if save_path is not None:
        cmd += ["--save-path", str(save_path)]
    log_path = state_path.with_name(state_path.name + ".log")  # a file, not a pipe: stderr can never block the app
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=dict(display_env), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.monotonic() + timeout_s
    while not read_state(state_path).get("ready"):
        if proc.poll() is not None:
            err = log_path.read_text(errors="replace")[-1000:]
            raise RuntimeError(f"desktop app exited with {proc.returncode} before it was ready: {err}")
        if time.monotonic() >= deadline:
            stop_app(proc)
            raise TimeoutError(f"desktop app not ready after {timeout_s:g}s")
        time.sleep(0.02)
    return proc


def stop_app(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Terminate, then kill, the app we started."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
