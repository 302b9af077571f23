"""The OS agent end to end with the tiny random-weight checkpoint in the real engine: REST ingress, TaskRunner,
the SDK, and a desktop the operator configured (KIMIRAY_DESKTOPS): Xvfb directly, and a remote desktop host over
HTTP. Random weights act at random, so the checks are the safety contract: only parsed, on-screen, allowed
actions run, and the run ends cleanly within its budget with a report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from pydantic import TypeAdapter

import kimiray
from agents.os_agent.harness.launch import launch_app, read_state, stop_app
from agents.os_agent.policy import SafetyPolicy, check
from connectors.desktop.actions import ScreenAction
from tests.task_server import task_server

pytestmark = pytest.mark.skipif(any(shutil.which(b) is None for b in ("Xvfb", "xdotool")),
                                reason="needs Xvfb and xdotool (scripts/test.sh installs them)")
KEY, OTHER = "sk-os-e2e-001", "sk-os-e2e-002"
HOST_TOKEN = "desktop-host-token-xyz"
SCREEN = (800, 600)
ENDINGS = {"done", "failed", "max_steps", "step_failures", "time_budget", "no_reply"}


def _check_run(done, policy: SafetyPolicy, max_seconds: float) -> list[dict]:
    assert done.status == "succeeded", done.error
    result = done.result
    assert result["outcome"] in ENDINGS and result["elapsed_s"] <= max_seconds + 30
    steps = result["trajectory"]
    assert steps and [s["index"] for s in steps] == list(range(len(steps)))
    for step in steps:
        assert step["status"] in {"executed", "terminal", "malformed", "off_screen", "blocked", "rejected", "error",
                                  "asked"}
        if step["status"] == "executed":  # executed => parsed, on screen, allowed
            action = TypeAdapter(ScreenAction).validate_python(step["action"])
            assert all(0 <= x < SCREEN[0] and 0 <= y < SCREEN[1] for x, y in action.points())
            assert check(policy, action, step["window_title"]).allowed
        if step["status"] in ("malformed", "off_screen"):
            assert step["status"] == "off_screen" or step["action"] is None
    return steps


def test_tiny_model_drives_a_real_desktop_only_through_checked_actions(
        tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from connectors.desktop.x11 import X11Executor
    from connectors.desktop.xvfb import VirtualDisplay
    from engine.runtime.engine import AsyncEngine
    from tests.os_agent_helpers import desktop_host

    monkeypatch.setenv("KIMIRAY_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tiny-kimi-vl").symlink_to(tiny_checkpoint)
    engine = AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)
    with VirtualDisplay(*SCREEN) as display, desktop_host(X11Executor(display.display), HOST_TOKEN) as (host, _):
        monkeypatch.setenv("DESKTOP_HOST_TOKEN", HOST_TOKEN)
        monkeypatch.setenv("KIMIRAY_DESKTOPS", json.dumps({
            "lab": {"kind": "x11", "display": display.display},
            "remote": {"kind": "http", "url": host, "token_env": "DESKTOP_HOST_TOKEN"}}))
        state = tmp_path / "app.json"
        app = launch_app(display.env(), state)
        try:
            with task_server(f"sqlite:///{tmp_path / 'stores'}", f"{KEY},{OTHER}", engine=engine) as url, \
                    kimiray.Client(url, api_key=KEY) as client:
                # Kimi-VL's pyautogui form: random weights rarely produce a parseable call -> malformed steps,
                # each re-prompted once, none executed; the failure limit ends the run.
                base = {"goal": "Type 'Ada Lovelace' into the Name field and press Submit.",
                        "screenshot_max_side": 400, "max_output_tokens": 48, "settle_s": 0.05,
                        "max_seconds": 240}
                first = client.submit("os_agent", {**base, "desktop": "lab", "max_steps": 3,
                                                   "max_consecutive_failures": 2})
                # JSON mode over the remote desktop host: guided decoding makes every reply an action, so
                # random clicks, keys and text really run - under the default policy and budgets.
                second = client.submit("os_agent", {**base, "desktop": "remote", "action_format": "json",
                                                    "max_steps": 4, "max_output_tokens": 160})
                policy = SafetyPolicy()
                done = client.wait(first.id, timeout=600)
                steps = _check_run(done, policy, base["max_seconds"])
                assert all(s["status"] != "executed" or s["action"] for s in steps)
                done2 = client.wait(second.id, timeout=600)
                steps2 = _check_run(done2, policy, base["max_seconds"])
                assert any(s["status"] in ("executed", "terminal", "rejected", "blocked", "off_screen")
                           for s in steps2)  # JSON mode always parses

                events = list(client.stream_events(second.id))
                results = [e for e in events if e.type == "step_result"]
                assert len(results) == len(steps2) and events[-1].data["status"] == "succeeded"
                html = client.download_artifact(second.id, "report").decode()
                assert "<html" in html.lower() and html.count("<img") >= len(steps2)
                trajectory = json.loads(client.download_artifact(second.id, "trajectory"))
                assert [s["index"] for s in trajectory["steps"]] == list(range(len(steps2)))

                # the confirm route: ended task -> 409, another key -> 404, bad body -> 422
                with pytest.raises(kimiray.errors.ConflictError):
                    client.confirm(second.id, 0, approve=True)
                with httpx.Client(base_url=url, timeout=30) as http:
                    own = {"Authorization": f"Bearer {KEY}"}
                    r = http.post(f"/v1/tasks/{second.id}/confirm", json={"step": 0, "approve": True}, headers=own)
                    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
                    r = http.post(f"/v1/tasks/{second.id}/confirm", json={"step": 0, "approve": True},
                                  headers={"Authorization": f"Bearer {OTHER}"})
                    assert r.status_code == 404
                    r = http.post(f"/v1/tasks/{second.id}/confirm", json={"step": -1}, headers=own)
                    assert r.status_code == 422
                    # the reply route (ask-the-user) has the same rules
                    with pytest.raises(kimiray.errors.ConflictError):
                        client.reply(second.id, 0, "Ada")
                    r = http.post(f"/v1/tasks/{second.id}/reply", json={"step": 0, "text": "x"},
                                  headers={"Authorization": f"Bearer {OTHER}"})
                    assert r.status_code == 404
                    for body in ({"step": 0, "text": ""}, {"step": 0}, {"step": 0, "text": "x" * 4001}):
                        r = http.post(f"/v1/tasks/{second.id}/reply", json=body, headers=own)
                        assert r.status_code == 422, body
                    # an unknown desktop is refused at submission (the configured names in the message)
                    bad = http.post("/v1/tasks", json={"type": "os_agent", "input": {"goal": "x",
                                                                                      "desktop": "nope"}},
                                    headers=own)
                    assert bad.status_code == 422 and bad.json()["error"]["param"] == "input.desktop", bad.text
                    assert "lab" in bad.json()["error"]["message"] and "remote" in bad.json()["error"]["message"]
            assert read_state(state)["ready"] is True  # the app survived whatever the model did
        finally:
            stop_app(app)
