"""The task harness: small goals on the Tk test app (``desktop_app``) with programmatic success checks.

Each task names its goal (what the agent is told) and a check over the app's state file (and the file it saves).
``run_task`` starts a fresh app on a display, runs any agent callable, and scores the outcome; tests run it with
a scripted model and the end-to-end suite with the real engine, benchmarks time it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agents.os_agent.harness.launch import launch_app, read_state, stop_app


@dataclass(frozen=True)
class HarnessTask:
    name: str
    goal: str
    check: Callable[[dict[str, Any], Path], bool]


def _saved(state: dict[str, Any], save_path: Path, text: str) -> bool:
    return bool(state.get("saved")) and save_path.exists() and save_path.read_text() == text


TASKS: dict[str, HarnessTask] = {t.name: t for t in [
    HarnessTask("fill_form", "Type 'Ada Lovelace' into the Name field and press Submit.",
                lambda s, p: s.get("submitted") is True and s.get("submitted_name") == "Ada Lovelace"),
    HarnessTask("press_checkbox", "Tick the 'I agree' checkbox.", lambda s, p: s.get("agree") is True),
    HarnessTask("save_file", "Type 'report 42' into the Name field and press Save.",
                lambda s, p: _saved(s, p, "report 42")),
    HarnessTask("scroll_list", "Scroll the item list down until item 30 is visible.",
                lambda s, p: 16 <= int(s.get("items_top", 0)) <= 30),
    HarnessTask("drag_square", "Drag the blue square at least 100 pixels to the right.",
                lambda s, p: int(s.get("square", [20, 20])[0]) >= 120),
]}


class TaskOutcome(BaseModel):
    task: str
    passed: bool
    agent_result: Any = None
    state: dict[str, Any] = {}


async def run_task(task: HarnessTask, display_env: dict[str, str], workdir: Path,
                   agent: Callable[[HarnessTask, Path], Awaitable[Any]], *, x: int = 0, y: int = 0) -> TaskOutcome:
    """A fresh app for ``task``; ``agent(task, state_path)`` acts on the display; then the check decides."""
    workdir.mkdir(parents=True, exist_ok=True)
    state_path, save_path = workdir / f"{task.name}.state.json", workdir / f"{task.name}.saved.txt"
    save_path.unlink(missing_ok=True)
    proc = launch_app(display_env, state_path, x=x, y=y, save_path=save_path)
    try:
        result = await agent(task, state_path)
        state = read_state(state_path)
        return TaskOutcome(task=task.name, passed=task.check(state, save_path), agent_result=result, state=state)
    finally:
        stop_app(proc)
