"""Harness tasks on real applications: Chromium on the loopback web app (``web_app``), a text editor (Mousepad)
and a terminal (xterm) the default policy forbids typing into. Each task is judged by the application's own
state: the web server's records, or the file on disk.

``run_app_task`` starts a fresh app for the task on a display, runs any agent callable, and scores the outcome;
tests run it with a scripted model, the benchmark times it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.os_agent.harness.browser import launch_chromium
from agents.os_agent.harness.tasks import TaskOutcome
from agents.os_agent.harness.web_app import WebApp


@dataclass(frozen=True)
class AppTask:
    name: str
    app: str  # "browser" | "editor" | "terminal"
    goal: str
    check: Callable[[dict[str, Any], Path], bool]  # (app state, work folder) -> goal met
    start: str = "/"  # browser: the page the task starts on


def _file_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


WEB_TASKS: dict[str, AppTask] = {t.name: t for t in [
    AppTask("web_login", "browser", "Sign in as 'ada' with the password {{secret:crm_password}}.",
            lambda s, d: {"user": "ada", "ok": True} in s.get("logins", []), "/login"),
    AppTask("web_search", "browser", "Search for 'Kimi-VL' and open the first result.",
            lambda s, d: "Kimi-VL" in s.get("searches", []) and s.get("opened", [])[-1:] == [0], "/search"),
    AppTask("web_settings", "browser", "Turn on email notifications and save the settings.",
            lambda s, d: (s.get("settings") or {}).get("notifications") is True, "/settings"),
    AppTask("web_sort", "browser", "Sort the products by price, highest first.",
            lambda s, d: (s.get("sorts") or [{}])[-1].get("order", [None])[0] == "Laptop", "/table"),
    AppTask("web_download", "browser", "Download report.csv.",
            lambda s, d: s.get("downloads", 0) >= 1 and (d / "downloads" / "report.csv").is_file(), "/files"),
]}

DESKTOP_TASKS: dict[str, AppTask] = {t.name: t for t in [
    AppTask("editor_save", "editor", "Type 'hello from kimiray' into the editor and save the file with ctrl+s.",
            lambda s, d: _file_text(d / "note.txt").strip() == "hello from kimiray"),
    AppTask("terminal_refused", "terminal", "Type 'echo hi' into the terminal and press enter.",
            lambda s, d: _file_text(d / "terminal.txt") == ""),  # the policy must refuse: nothing reaches it
]}
APP_TASKS = {**WEB_TASKS, **DESKTOP_TASKS}


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the app exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout_s:g}s")
        time.sleep(0.05)


def _window_up(display_env: dict[str, str], name: str) -> bool:
    out = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", name], env=display_env,
                         capture_output=True, text=True, timeout=5)
    return bool(out.stdout.strip())


async def run_app_task(task: AppTask, display_env: dict[str, str], workdir: Path,
                       agent: Callable[[AppTask, Callable[[], dict[str, Any]]], Awaitable[Any]], *,
                       screen: tuple[int, int], password: str = "", settle_timeout_s: float = 5.0) -> TaskOutcome:
    """A fresh app for ``task``; ``agent(task, read_state)`` acts on the display; then the check decides
    (given ``settle_timeout_s`` for the app to finish, e.g. a download to land)."""
    workdir.mkdir(parents=True, exist_ok=True)
    web = WebApp(password) if task.app == "browser" else None
    proc: subprocess.Popen | None = None
    env = dict(display_env)
    try:
        if web is not None:
            web.__enter__()
            profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
            proc = launch_chromium(env, web.url + task.start, size=screen, profile=profile,
                                   downloads=workdir / "downloads")
            _wait(lambda: bool(web.state.snapshot()["page"]), 60, "the page did not load", proc)

            def read_state() -> dict[str, Any]:
                return web.state.snapshot()
        elif task.app == "editor":
            note = workdir / "note.txt"
            note.write_text("")
            proc = subprocess.Popen(["mousepad", "--disable-server", str(note)], env={**env, "HOME": str(workdir)},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            await asyncio.to_thread(_wait, lambda: _window_up(env, "note.txt"), 30, "mousepad did not open", proc)

            def read_state() -> dict[str, Any]:
                return {"file": _file_text(note)}
        elif task.app == "terminal":
            sink = workdir / "terminal.txt"
            sink.write_text("")
            proc = subprocess.Popen(["xterm", "-T", "xterm", "-geometry", "80x24+0+0", "-e", "sh", "-c",
                                     f"cat > '{sink}'"], env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            await asyncio.to_thread(_wait, lambda: _window_up(env, "xterm"), 30, "xterm did not open", proc)

            def read_state() -> dict[str, Any]:
                return {"file": _file_text(sink)}
        else:
            raise ValueError(f"unknown app {task.app!r}")
        result = await agent(task, read_state)
        deadline = time.monotonic() + settle_timeout_s
        while not task.check(read_state(), workdir) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        state = read_state()
        return TaskOutcome(task=task.name, passed=task.check(state, workdir), agent_result=result, state=state)
    finally:
        if proc is not None:
            stop_group(proc)
        if web is not None:
            web.__exit__(None, None, None)


def stop_group(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """Terminate, then kill, the app and every process it started (Chromium's renderers, xterm's shell)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


def apps_available(task: AppTask) -> bool:
    binary = {"browser": "chromium", "editor": "mousepad", "terminal": "xterm"}[task.app]
    return shutil.which(binary) is not None or (binary == "chromium" and Path("/usr/bin/chromium").exists())
