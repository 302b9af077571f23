"""The OS agent on real applications on a real Xvfb desktop: Chromium on a loopback web app (login with an
operator secret, search, settings, table sort, download), Mousepad (type and save a file) and xterm (the default
policy refuses typing into it). A scripted model answers in Kimi-VL's report format (Thought/Action/Toolcall)
through the real TaskRunner; success is judged by the app's own state (the web server's records, files on disk)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from agents.os_agent.agent import register_desktop, unregister_desktop
from agents.os_agent.harness.web_tasks import APP_TASKS, apps_available, run_app_task
from agents.registry import build_registry
from agents.runner import RunnerOptions, TaskRunner
from connectors.stores import open_stores
from connectors.stores.base import TaskSubmission
from tests.os_agent_helpers import AppReadingModel, request_texts

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(any(shutil.which(b) is None for b in ("Xvfb", "xdotool")),
                                 reason="needs Xvfb and xdotool (scripts/test.sh installs them)")]
OWNER = "key-apps"
SCREEN = (1024, 768)
PASSWORD = "Crm-pa55word-42"


@pytest.fixture(scope="module")
def display():
    from connectors.desktop.xvfb import VirtualDisplay

    with VirtualDisplay(*SCREEN) as vd:
        yield vd


@pytest.fixture()
def desktop(display, monkeypatch):
    from connectors.desktop.x11 import X11Executor

    monkeypatch.setenv("KIMIRAY_OS_SECRETS", json.dumps({"crm_password": PASSWORD}))
    register_desktop("xvfb", lambda: X11Executor(display.display))
    yield "xvfb"
    unregister_desktop("xvfb")


async def _run(tmp: Path, model: Any, input: dict[str, Any]):
    stores = open_stores(f"sqlite:///{tmp / 'stores'}")
    runner = TaskRunner(stores, build_registry(), model, RunnerOptions(lease_s=30, retry_delay_s=0))
    record, _ = await stores.tasks.submit(OWNER, TaskSubmission(type="os_agent", input=input))
    done = await runner.run_once()
    return stores, done, await stores.tasks.events(record.id)


@pytest.mark.parametrize("name", sorted(APP_TASKS))
def test_scripted_agent_on_real_apps(name: str, display, desktop, tmp_path: Path) -> None:
    task = APP_TASKS[name]
    if not apps_available(task):
        pytest.skip(f"{task.app} is not installed (scripts/test.sh installs chromium, mousepad, xterm)")

    async def agent(task, read_state):
        model = AppReadingModel(read_state, SCREEN, display.env())
        stores, done, events = await _run(tmp_path, model, {"goal": task.goal, "desktop": "xvfb", "max_steps": 12,
                                                            "settle_s": 0.3, "max_consecutive_failures": 1})
        return {"done": done, "events": events, "model": model, "stores": stores}

    outcome = asyncio.run(run_app_task(task, display.env(), tmp_path / "app", agent, screen=SCREEN,
                                       password=PASSWORD))
    got = outcome.agent_result
    done = got["done"]
    assert outcome.passed, (outcome.state, done.result)
    steps = done.result["trajectory"]
    if name == "terminal_refused":  # the default policy refuses typing into a terminal: nothing reached it
        assert steps[0]["status"] == "blocked" and "terminal" in steps[0]["detail"]
        assert done.result["outcome"] in ("failed", "step_failures")
        return
    assert done.result["outcome"] == "done", steps
    assert [s["status"] for s in steps] == ["executed"] * (len(steps) - 1) + ["terminal"]
    if name == "web_login":  # the password reached the app, and nothing of ours saw it
        everything = json.dumps([done.result, [e.data for e in got["events"]],
                                 [request_texts(r) for r in got["model"].requests]], default=str)
        assert PASSWORD not in everything and "{{secret:crm_password}}" in everything
        _check_recording(got["stores"], done.result, steps, tmp_path)


def _check_recording(stores, result: dict[str, Any], steps: list[dict[str, Any]], tmp: Path) -> None:
    """The MP4 artifact: two frames a step at the screen's size, the action drawn, the secret's placeholder (never
    its value) in the overlay - read back with Tesseract from the frame of the typing step."""
    import io
    import subprocess

    import av

    art = result["artifacts"]["recording"]
    assert art["filename"].endswith(".mp4")
    data = asyncio.run(stores.blobs.get(OWNER, art["ref"]))
    assert 0 < len(data) < 20 * 1024 * 1024
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    assert len(frames) == 2 * len(steps) and frames[0].size == SCREEN
    typed = next(i for i, s in enumerate(steps) if (s["action"] or {}).get("text", "").startswith("{{secret"))
    banner = frames[2 * typed].crop((0, 0, 500, 22)).resize((2000, 88))
    banner.save(tmp / "banner.png")
    if shutil.which("tesseract"):
        text = subprocess.run(["tesseract", str(tmp / "banner.png"), "-", "--psm", "7"], capture_output=True,
                              text=True, timeout=60).stdout
        assert "secret" in text and PASSWORD not in text, text


def test_tiny_checkpoint_on_the_browser_ends_cleanly(display, desktop, tmp_path: Path, tiny_checkpoint: Path,
                                                     monkeypatch) -> None:
    """The real engine with random weights on the sign-in page: whatever it says, the run ends within its budget,
    every step is a recorded success or failure, only parsed and allowed actions ran, and no sink sees the
    secret."""
    import torch
    from pydantic import TypeAdapter

    from agents.os_agent.agent import FAILED_STATUSES
    from agents.os_agent.policy import SafetyPolicy, check
    from connectors.backend import LocalBackend
    from connectors.desktop.actions import ScreenAction
    from connectors.model_client import BackendModelClient
    from engine.runtime.engine import AsyncEngine

    monkeypatch.setenv("KIMIRAY_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tiny-kimi-vl").symlink_to(tiny_checkpoint)
    torch.set_num_threads(2)
    model = BackendModelClient(LocalBackend(AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu",
                                                                       dtype=torch.float32)))
    task = APP_TASKS["web_login"]

    async def agent(task, read_state):
        return await _run(tmp_path, model, {"goal": task.goal, "desktop": "xvfb", "max_steps": 3, "settle_s": 0.1,
                                            "max_output_tokens": 32, "screenshot_max_side": 512,
                                            "max_consecutive_failures": 2, "max_seconds": 240})

    outcome = asyncio.run(run_app_task(task, display.env(), tmp_path / "app", agent, screen=SCREEN,
                                       password=PASSWORD, settle_timeout_s=0))
    _, done, events = outcome.agent_result
    assert done.status == "succeeded", done.error
    result = done.result
    assert result["outcome"] in ("done", "failed", "max_steps", "step_failures") and result["elapsed_s"] < 240
    steps = result["trajectory"]
    assert steps and [s["index"] for s in steps] == list(range(len(steps)))
    for step in steps:
        assert step["status"] in FAILED_STATUSES | {"executed", "terminal", "asked"}
        if step["status"] == "executed":
            action = TypeAdapter(ScreenAction).validate_python(step["action"])
            assert check(SafetyPolicy(), action, step["window_title"]).allowed
    assert PASSWORD not in json.dumps([result, [e.data for e in events]], default=str)
