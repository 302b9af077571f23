"""The OS agent on a real X display (Xvfb + xdotool + the Tk test app), driven by a scripted model that answers
in Kimi-VL's format, through the real TaskRunner and embedded stores. Success is judged by the app's own state."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from agents.os_agent.agent import OSAgentLoop, register_desktop, unregister_desktop
from agents.os_agent.harness.launch import launch_app, read_state, stop_app
from agents.os_agent.harness.tasks import TASKS, run_task
from agents.os_agent.inputs import OSAgentInput
from agents.registry import build_registry
from agents.runner import RunnerOptions, TaskRunner
from connectors.model_client import ModelUnavailableError
from connectors.stores import open_stores
from connectors.desktop.actions import TypeText
from connectors.stores.base import TaskSubmission
from tests.os_agent_helpers import ScreenReadingModel

pytestmark = pytest.mark.skipif(any(shutil.which(b) is None for b in ("Xvfb", "xdotool")),
                                reason="needs Xvfb and xdotool (scripts/test.sh installs them)")
OWNER = "key-os"
SCREEN = (1024, 768)


@pytest.fixture(scope="module")
def display():
    from connectors.desktop.xvfb import VirtualDisplay

    with VirtualDisplay(*SCREEN) as vd:
        yield vd


@pytest.fixture()
def desktop(display):
    from connectors.desktop.x11 import X11Executor

    register_desktop("xvfb", lambda: X11Executor(display.display))
    yield "xvfb"
    unregister_desktop("xvfb")


async def _run_task(tmp: Path, model: Any, input: dict[str, Any], *, runs: int = 1, stores: Any = None):
    stores = stores or open_stores(f"sqlite:///{tmp / 'stores'}")
    runner = TaskRunner(stores, build_registry(), model, RunnerOptions(lease_s=30, retry_delay_s=0))
    record, _ = await stores.tasks.submit(OWNER, TaskSubmission(type="os_agent", input=input))
    done = None
    for _ in range(runs):
        done = await runner.run_once()
    events = await stores.tasks.events(record.id)
    return stores, done, events


def _input(goal: str, **extra: Any) -> dict[str, Any]:
    return {"goal": goal, "desktop": "xvfb", "max_steps": 10, "settle_s": 0.15, **extra}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_scripted_agent_completes_every_harness_task(name: str, display, desktop, tmp_path: Path) -> None:
    task = TASKS[name]

    async def agent(task, state_path):
        model = ScreenReadingModel(state_path, SCREEN)
        stores, done, events = await _run_task(tmp_path, model, _input(task.goal))
        return {"done": done, "events": events, "stores": stores, "model": model}

    outcome = asyncio.run(run_task(task, display.env(), tmp_path / "app", agent))
    got = outcome.agent_result
    done = got["done"]
    assert outcome.passed, (outcome.state, done.result if done else None)
    assert done.status == "succeeded" and done.result["outcome"] == "done" and done.result["success"] is True
    steps = done.result["trajectory"]
    assert [s["status"] for s in steps] == ["executed"] * (len(steps) - 1) + ["terminal"]
    results = [e for e in got["events"] if e.type == "step_result"]
    assert [e.data["index"] for e in results] == list(range(len(steps)))
    # every model call saw exactly the screenshots of the policy (current + one earlier at most)
    for request in got["model"].requests:
        images = [p for m in request.messages if isinstance(m["content"], list) for p in m["content"]
                  if p.get("type") == "image"]
        assert 1 <= len(images) <= 2

    async def artifact() -> bytes:
        ref = done.result["artifacts"]["report"]["ref"]
        return await got["stores"].blobs.get(OWNER, ref)

    html = asyncio.run(artifact()).decode()
    assert task.goal.replace("'", "&#x27;") in html and html.count("<img") >= len(steps)


def test_json_action_mode_completes_a_task(display, desktop, tmp_path: Path) -> None:
    async def agent(task, state_path):
        model = ScreenReadingModel(state_path, SCREEN, json_mode=True)
        return await _run_task(tmp_path, model, _input(task.goal, action_format="json")), model

    outcome = asyncio.run(run_task(TASKS["fill_form"], display.env(), tmp_path / "app", agent))
    (_, done, _), model = outcome.agent_result
    assert outcome.passed and done.result["outcome"] == "done"
    assert all(r.json_schema and "anyOf" in r.json_schema["properties"]["action"] for r in model.requests)


def test_malformed_output_gets_one_corrective_reprompt_then_a_failed_step(display, desktop, tmp_path: Path) -> None:
    async def agent(task, state_path):
        model = ScreenReadingModel(state_path, SCREEN, first_replies=[
            "I will click the checkbox.",                      # step 1: malformed ...
            "```python\nos.system('xdg-open http://x')\n```",  # ... and again after the re-prompt: failed step
            "Let me think.",                                   # step 2: malformed, the re-prompt then succeeds
        ])
        stores, done, events = await _run_task(tmp_path, model, _input(task.goal))
        return done, model

    outcome = asyncio.run(run_task(TASKS["press_checkbox"], display.env(), tmp_path / "app", agent))
    done, model = outcome.agent_result
    steps = done.result["trajectory"]
    assert steps[0]["status"] == "malformed" and steps[0]["action"] is None
    assert "unknown call" in steps[0]["detail"]
    assert steps[1]["status"] == "executed" and outcome.passed
    correction = model.requests[1].messages[-1]["content"]
    assert "could not be executed" in correction and "no action found" in correction
    assert len(model.requests) == len(steps) + 2  # one re-prompt per malformed first reply


def test_off_screen_blocked_and_unknown_actions_never_execute(display, desktop, tmp_path: Path) -> None:
    probe_state = tmp_path / "probe.json"
    proc = launch_app(display.env(), probe_state)
    box = read_state(probe_state)["widgets"]["dangerous"]
    stop_app(proc)
    x, y = (box[0] + box[2]) / 2 / SCREEN[0], (box[1] + box[3]) / 2 / SCREEN[1]

    async def agent(task, state_path):
        model = ScreenReadingModel(state_path, SCREEN, first_replies=[
            "```python\npyautogui.click(x=1.7, y=0.2)\n```",                 # off screen
            "```python\npyautogui.hotkey('ctrl', 'alt', 'backspace')\n```",   # blocked hotkey
            f"```python\npyautogui.click(x={x:.4f}, y={y:.4f})\n```",         # blocked region
            "```python\npyautogui.press('hypermega')\n```",                 # key the executor rejects
        ])
        policy = {"blocked_regions": [{"x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
                                       "name": "danger zone"}]}
        return await _run_task(tmp_path, model, _input(task.goal, policy=policy, max_consecutive_failures=5))

    outcome = asyncio.run(run_task(TASKS["press_checkbox"], display.env(), tmp_path / "app", agent))
    _, done, _ = outcome.agent_result
    statuses = [s["status"] for s in done.result["trajectory"]]
    assert statuses[:4] == ["off_screen", "blocked", "blocked", "rejected"], done.result["trajectory"]
    assert "danger zone" in done.result["trajectory"][2]["detail"]
    assert outcome.state["dangerous_clicked"] is False and outcome.passed  # then it recovered and finished


def test_step_failures_end_the_run_cleanly(display, desktop, tmp_path: Path) -> None:
    async def agent(task, state_path):
        model = ScreenReadingModel(state_path, SCREEN, first_replies=["nonsense"] * 20)
        return await _run_task(tmp_path, model, _input(task.goal, max_consecutive_failures=2))

    outcome = asyncio.run(run_task(TASKS["fill_form"], display.env(), tmp_path / "app", agent))
    _, done, _ = outcome.agent_result
    assert done.status == "succeeded" and done.result["outcome"] == "step_failures"
    assert done.result["success"] is False and done.result["steps"] == 2 and done.result["executed"] == 0
    assert outcome.state["name"] == "" and not outcome.passed


def test_budgets_end_the_run(display, desktop, tmp_path: Path) -> None:
    async def agent(task, state_path):
        model = ScreenReadingModel(state_path, SCREEN)
        _, by_steps, _ = await _run_task(tmp_path / "a", model, _input(task.goal, max_steps=2))
        model = ScreenReadingModel(state_path, SCREEN, first_replies=["```python\ntime.sleep(1.5)\n```"] * 5)
        started = time.monotonic()
        _, by_time, _ = await _run_task(tmp_path / "b", model, _input(task.goal, max_seconds=2.0))
        return by_steps, by_time, time.monotonic() - started

    outcome = asyncio.run(run_task(TASKS["fill_form"], display.env(), tmp_path / "app", agent))
    by_steps, by_time, seconds = outcome.agent_result
    assert by_steps.result["outcome"] == "max_steps" and by_steps.result["steps"] == 2
    assert by_time.result["outcome"] == "time_budget" and seconds < 15


def test_a_dead_desktop_is_a_step_failure_never_a_stuck_task(tmp_path: Path) -> None:
    from connectors.desktop.x11 import X11Executor
    from connectors.desktop.xvfb import VirtualDisplay

    doomed = VirtualDisplay(640, 480).start()
    register_desktop("doomed", lambda: X11Executor(doomed.display, command_timeout_s=5))
    try:
        state = tmp_path / "app.json"
        proc = launch_app(doomed.env(), state)

        class KillsTheDisplay(ScreenReadingModel):
            async def generate(self, request):
                reply = await super().generate(request)
                if len(self.requests) == 2:
                    stop_app(proc)
                    doomed.close()  # the X server dies between the model's answer and the action
                return reply

        model = KillsTheDisplay(state, (640, 480))
        started = time.monotonic()
        _, done, events = asyncio.run(_run_task(tmp_path, model, {
            "goal": TASKS["fill_form"].goal, "desktop": "doomed", "settle_s": 0.1, "max_consecutive_failures": 2}))
        assert time.monotonic() - started < 60
        statuses = [s["status"] for s in done.result["trajectory"]]
        assert statuses[0] == "executed" and statuses[-2:] == ["error", "error"]
        assert done.status == "succeeded" and done.result["outcome"] == "step_failures"
        assert any("failed" in s["detail"] for s in done.result["trajectory"][1:])
    finally:
        unregister_desktop("doomed")
        doomed.close()


def test_risky_actions_wait_for_confirmation(display, desktop, tmp_path: Path) -> None:
    """Through the task layer: a ``confirmation_required`` event, approval written where
    ``POST /v1/tasks/{id}/confirm`` writes it; a second risky action is declined."""

    async def agent(task, state_path):
        stores = open_stores(f"sqlite:///{tmp_path / 'stores'}")
        model = ScreenReadingModel(state_path, SCREEN)
        run = asyncio.create_task(_run_task(tmp_path, model, _input(
            task.goal, policy={"confirm": ["type", "text:never"]}, confirm_timeout_s=20), stores=stores))
        approved = set()
        while not run.done():
            page = await stores.tasks.list(OWNER, limit=5)
            for t in page.tasks:
                for e in await stores.tasks.events(t.id):
                    if e.type == "confirmation_required" and e.data["step"] not in approved:
                        approved.add(e.data["step"])
                        assert e.data["action"]["kind"] == "type"
                        await stores.sessions.set_partial(t.session_id, OWNER, f"confirm.{e.data['step']}", True)
            await asyncio.sleep(0.1)
        return await run, approved

    outcome = asyncio.run(run_task(TASKS["fill_form"], display.env(), tmp_path / "app", agent))
    (_, done, events), approved = outcome.agent_result
    assert outcome.passed and len(approved) == 1
    assert [e.data["approved"] for e in events if e.type == "confirmation"] == [True]

    async def sdk_decline():  # an SDK hook that says no: the action is blocked, never executed
        from agents.base import AgentContext
        from connectors.desktop.x11 import X11Executor

        stores = open_stores(f"sqlite:///{tmp_path / 'sdk'}")
        await stores.sessions.create(OWNER, session_id="sess_sdk")
        asked = []

        async def hook(step, action, reason):
            asked.append((step, action.kind, reason))
            return False

        async def emit(type_, data):
            return None

        state = tmp_path / "sdk.json"
        proc = launch_app(display.env(), state)
        try:
            model = ScreenReadingModel(state, SCREEN, first_replies=[
                "pyautogui.write(message='Ada Lovelace')", "FAIL"])
            ctx = AgentContext(task_id="task_sdk", owner=OWNER, session_id="sess_sdk", options={}, attempt=1,
                               model=model, sessions=stores.sessions, blobs=stores.blobs, emit=emit,
                               cancelled=lambda: False)
            loop = OSAgentLoop(ctx, X11Executor(display.display),
                               OSAgentInput(goal="type", policy={"confirm": ["type"]}, settle_s=0.1), confirm=hook)
            result = await loop.run()
            return result, asked, read_state(state)
        finally:
            stop_app(proc)

    result, asked, state = asyncio.run(sdk_decline())
    assert asked and asked[0][1] == "type" and state["name"] == ""
    assert result["trajectory"][0]["status"] == "blocked" and "declined" in result["trajectory"][0]["detail"]
    assert result["outcome"] == "failed"


def test_an_interrupted_run_resumes_after_its_last_recorded_step(display, desktop, tmp_path: Path) -> None:
    class DiesOnce(ScreenReadingModel):
        async def generate(self, request):
            if len(self.requests) == 2 and not getattr(self, "died", False):
                self.died = True
                raise ModelUnavailableError("replica restarting")
            return await super().generate(request)

    async def agent(task, state_path):
        model = DiesOnce(state_path, SCREEN)
        return await _run_task(tmp_path, model, _input(task.goal), runs=2)

    outcome = asyncio.run(run_task(TASKS["fill_form"], display.env(), tmp_path / "app", agent))
    stores, done, events = outcome.agent_result
    assert outcome.passed and done.status == "succeeded" and done.attempts >= 1
    indices = [e.data["index"] for e in events if e.type == "step_result"]
    assert indices == list(range(len(done.result["trajectory"])))  # no step recorded twice
    assert any(e.type == "resumed" for e in events)
    assert sum(1 for e in events if e.type == "status" and e.data.get("status") == "succeeded") == 1


def test_a_recorded_run_replays_through_the_task_api(display, desktop, tmp_path: Path) -> None:
    from connectors.desktop.replay import TrajectoryRecorder
    from connectors.desktop.x11 import X11Executor

    recorder: dict[str, Any] = {}

    def recording():
        recorder["r"] = TrajectoryRecorder(X11Executor(display.display))
        return recorder["r"]

    register_desktop("recorded", recording)
    try:
        async def agent(task, state_path):
            model = ScreenReadingModel(state_path, SCREEN)
            return await _run_task(tmp_path, model, {**_input(task.goal), "desktop": "recorded"})

        outcome = asyncio.run(run_task(TASKS["press_checkbox"], display.env(), tmp_path / "app", agent))
        assert outcome.passed
        trajectory = recorder["r"].trajectory
        _, first, _ = outcome.agent_result

        async def replay():
            stores = open_stores(f"sqlite:///{tmp_path / 'replay'}")
            ref = await stores.blobs.put(OWNER, trajectory.model_dump_json().encode(), "application/json")

            from connectors.model_client import ModelReply

            answers = [step["action"] for step in first.result["trajectory"]]

            class SameAnswers:
                calls = 0

                async def generate(self, request):
                    action = answers[self.calls]
                    self.calls += 1
                    if action["kind"] == "done":
                        return ModelReply(text="DONE", finish_reason="stop")
                    x, y = (action["x"] + 0.5) / SCREEN[0], (action["y"] + 0.5) / SCREEN[1]
                    return ModelReply(text=f"pyautogui.click(x={x:.6f}, y={y:.6f})", finish_reason="stop")

            return await _run_task(tmp_path / "r", SameAnswers(), {"goal": "replay", "replay": ref.ref,
                                                                   "settle_s": 0}, stores=stores)

        _, again, _ = asyncio.run(replay())
        assert again.result["outcome"] == "done"
        assert [s["action"] for s in again.result["trajectory"]] == [s["action"] for s in first.result["trajectory"]]
    finally:
        unregister_desktop("recorded")


def test_input_is_checked_at_submission() -> None:
    registry = build_registry()
    for bad in [{}, {"goal": ""}, {"goal": "x", "max_steps": 0}, {"goal": "x", "desktop": "../etc"},
                {"goal": "x", "replay": "not-a-ref"}, {"goal": "x", "coordinates": "polar"},
                {"goal": "x", "policy": {"blocked_text": ["("]}}, {"goal": "x", "surprise": 1},
                {"goal": "x", "desktop": "a", "replay": "0" * 64}]:
        with pytest.raises(Exception) as info:
            registry.validate("os_agent", bad)
        assert "os_agent" in str(info.value)


def test_cancel_stops_the_run_at_the_next_step(display, desktop, tmp_path: Path) -> None:
    class Slow(ScreenReadingModel):
        async def generate(self, request):
            await asyncio.sleep(0.3)
            return await super().generate(request)

    async def agent(task, state_path):
        stores = open_stores(f"sqlite:///{tmp_path / 'stores'}")
        runner = TaskRunner(stores, build_registry(), Slow(state_path, SCREEN, first_replies=["WAIT"] * 50),
                            RunnerOptions(lease_s=1.5, retry_delay_s=0))
        record, _ = await stores.tasks.submit(OWNER, TaskSubmission(type="os_agent", input=_input(
            task.goal, max_steps=50, max_consecutive_failures=50)))
        run = asyncio.create_task(runner.run_once())
        while not [e for e in await stores.tasks.events(record.id) if e.type == "step_result"]:
            await asyncio.sleep(0.05)
        await stores.tasks.cancel(record.id, OWNER)
        cancelled_at = time.monotonic()
        done = await run
        return done, time.monotonic() - cancelled_at, await stores.tasks.events(record.id)

    outcome = asyncio.run(run_task(TASKS["fill_form"], display.env(), tmp_path / "app", agent))
    done, seconds, events = outcome.agent_result
    assert done.status == "cancelled" and seconds < 15
    assert len([e for e in events if e.type == "step_result"]) < 50


def test_accessibility_text_reaches_the_prompt_and_yields_first(tiny_checkpoint) -> None:
    from PIL import Image

    from agents.os_agent.history import StepPrompt
    from pipelines.context import TokenCounter

    counter = TokenCounter.from_pretrained(tiny_checkpoint)
    shot = Image.new("RGB", (320, 200), "white")
    tree = "\n".join(f"button 'Item {i}' at ({i}, {i})" for i in range(400))
    prompt = StepPrompt(counter=counter, window=100_000, max_tokens=64, goal="g")
    messages, _ = prompt.build([], shot, title=None, index=0, accessibility=tree)
    assert "button 'Item 399'" in str(messages[-1]["content"])
    small = StepPrompt(counter=counter, window=counter.count_messages(messages) // 3, max_tokens=64, goal="g")
    messages, info = small.build([], shot, title=None, index=0, accessibility=tree)
    assert info["tokens"] <= small.limit and "button 'Item 0'" in str(messages[-1]["content"])
    assert any(p.get("type") == "image" for p in messages[-1]["content"])


SECRET = "Zq7-hunter2-never-shown"


def test_secrets_are_typed_by_the_executor_and_reach_no_sink(display, desktop, tmp_path: Path, monkeypatch,
                                                             caplog) -> None:
    """The goal names ``{{secret:crm_password}}``; the app receives the value; prompts, events, step records,
    session messages and partials, the result, the trajectory and report artifacts and the logs never see it."""
    import json
    import logging

    from agents.os_agent.harness.tasks import HarnessTask
    from connectors.desktop.x11 import X11Executor
    from tests.os_agent_helpers import request_texts

    monkeypatch.setenv("KIMIRAY_OS_SECRETS", json.dumps({"crm_password": SECRET}))
    caplog.set_level(logging.DEBUG)
    task = HarnessTask("log_in", "Type the password {{secret:crm_password}} into the Password field and press "
                       "Log in.", lambda s, p: s.get("logged_in_with") == SECRET)

    async def agent(task, state_path):
        model = ScreenReadingModel(state_path, SCREEN)
        stores, done, events = await _run_task(tmp_path, model, _input(task.goal))
        session = done.result["session_id"]
        sinks = {
            "prompts": [request_texts(r) for r in model.requests],
            "events": [e.data for e in events],
            "result": done.result,
            "messages": [m.model_dump() for m in await stores.sessions.messages(session, OWNER)],
            "partials": await stores.sessions.partials(session, OWNER),
            "artifacts": [(await stores.blobs.get(OWNER, a["ref"])).decode()
                          for a in done.result["artifacts"].values() if a["filename"].endswith((".html", ".json"))],
        }
        return done, sinks

    outcome = asyncio.run(run_task(task, display.env(), tmp_path / "app", agent))
    done, sinks = outcome.agent_result
    assert outcome.passed and outcome.state["logged_in_with"] == SECRET and done.result["outcome"] == "done"
    typed = [s for s in done.result["trajectory"] if (s["action"] or {}).get("kind") == "type"]
    assert typed and typed[0]["action"]["text"] == "{{secret:crm_password}}"  # the record keeps the placeholder
    for name, sink in sinks.items():
        text = json.dumps(sink, default=str)
        assert SECRET not in text, name
        assert "{{secret:crm_password}}" in text or name in ("partials", "messages"), name
    assert SECRET not in caplog.text
    # typed text goes to xdotool on stdin, never on its command line (visible to every user in ps)
    assert SECRET not in " ".join(X11Executor(display.display)._plan(TypeText(text=SECRET)))


def test_unknown_secrets_and_redaction_of_what_comes_back(display, desktop, tmp_path: Path, monkeypatch) -> None:
    """A goal naming a secret the runner lacks fails before any step; a value that comes back through the
    accessibility text or an executor error is redacted before it is stored or shown."""
    import json

    from agents.base import AgentContext
    from agents.os_agent.secrets import Secrets
    from connectors.desktop.base import ExecutorError

    monkeypatch.setenv("KIMIRAY_OS_SECRETS", json.dumps({"crm_password": SECRET}))
    model = ScreenReadingModel(tmp_path / "none.json", SCREEN, first_replies=["FAIL"])
    _, done, _ = asyncio.run(_run_task(tmp_path, model, _input("use {{secret:other}} to log in")))
    assert done.status == "failed" and "other" in done.error.message and not model.requests

    class Leaky:
        """Echoes what it typed in its errors and its accessibility text, as a careless executor might."""

        def __init__(self, inner):
            self.inner = inner

        async def observe(self):
            obs = await self.inner.observe()
            return obs.model_copy(update={"accessibility_text": f"textbox value={SECRET}"})

        async def execute(self, action):
            raise ExecutorError(f"could not type {getattr(action, 'text', '')}")

        async def screen_size(self):
            return await self.inner.screen_size()

        async def close(self):
            return None

    async def run_loop():
        from connectors.desktop.x11 import X11Executor

        stores = open_stores(f"sqlite:///{tmp_path / 'leaky'}")
        await stores.sessions.create(OWNER, session_id="sess_leak")
        events = []

        async def emit(type_, data):
            events.append(data)

        model = ScreenReadingModel(tmp_path / "none.json", SCREEN, first_replies=[
            "pyautogui.write(message='{{secret:crm_password}}')", "FAIL"])
        ctx = AgentContext(task_id="task_leak", owner=OWNER, session_id="sess_leak", options={}, attempt=1,
                           model=model, sessions=stores.sessions, blobs=stores.blobs, emit=emit,
                           cancelled=lambda: False)
        loop = OSAgentLoop(ctx, Leaky(X11Executor(display.display)), OSAgentInput(goal="g", settle_s=0),
                           secrets=Secrets({"crm_password": SECRET}))
        return await loop.run(), model

    result, model = asyncio.run(run_loop())
    step = result["trajectory"][0]
    assert step["status"] == "error" and "could not type {{secret:crm_password}}" in step["detail"]
    from tests.os_agent_helpers import request_texts
    prompts = json.dumps([request_texts(r) for r in model.requests])
    assert SECRET not in json.dumps(result) and SECRET not in prompts and "{{secret:crm_password}}" in prompts


def test_the_model_asks_the_user_and_the_answer_reaches_the_next_step(display, desktop, tmp_path: Path) -> None:
    """``call_user(question)`` -> ``input_required`` event -> the answer written where ``POST
    /v1/tasks/{id}/reply`` writes it -> the next prompt carries it and the agent types it."""
    from agents.os_agent.harness.tasks import HarnessTask

    task = HarnessTask("ask", "Fill in the Name field (ask me which name) and press Submit.",
                       lambda s, p: s.get("submitted_name") == "Grace Hopper")

    async def agent(task, state_path):
        stores = open_stores(f"sqlite:///{tmp_path / 'stores'}")
        model = ScreenReadingModel(state_path, SCREEN)
        run = asyncio.create_task(_run_task(tmp_path, model, _input(task.goal, reply_timeout_s=20), stores=stores))
        asked = []
        while not run.done():
            for t in (await stores.tasks.list(OWNER, limit=5)).tasks:
                for e in await stores.tasks.events(t.id):
                    if e.type == "input_required" and e.data["step"] not in [a["step"] for a in asked]:
                        asked.append(e.data)
                        await stores.sessions.set_partial(t.session_id, OWNER, f"reply.{e.data['step']}",
                                                          "Grace Hopper")
            await asyncio.sleep(0.1)
        return await run, asked

    outcome = asyncio.run(run_task(task, display.env(), tmp_path / "app", agent))
    (_, done, events), asked = outcome.agent_result
    assert outcome.passed and done.result["outcome"] == "done"
    assert asked == [{"step": 0, "question": "Which name should I enter?", "timeout_s": 20.0}]
    first = done.result["trajectory"][0]
    assert first["status"] == "asked" and first["user_reply"] == "Grace Hopper"
    assert [e.data for e in events if e.type == "user_reply"] == [{"step": 0, "reply": "Grace Hopper"}]


def test_an_unanswered_question_ends_the_run_cleanly(display, desktop, tmp_path: Path) -> None:
    model = ScreenReadingModel(tmp_path / "none.json", SCREEN, first_replies=[
        "Thought: I need help.\nAction: ask\nToolcall: call_user(question='Which account?')"])
    started = time.monotonic()
    _, done, events = asyncio.run(_run_task(tmp_path, model, _input("g", reply_timeout_s=0.5)))
    assert done.status == "succeeded" and done.result["outcome"] == "no_reply" and done.result["success"] is False
    assert [e.type for e in events].count("input_required") == 1 and time.monotonic() - started < 30
    assert done.result["trajectory"][0]["detail"] == "nobody answered in time" and len(model.requests) == 1
