"""Helpers for OS-agent tests: a desktop host over HTTP (``desktop_host``) and a scripted model that "sees" the Tk
test app through the app's state file (widget boxes in screen pixels) and answers like Kimi-VL does - a pyautogui call with fractional coordinates - so every layer
below the model (prompting, parsing, conversion, policy, the real X11 executor on Xvfb) is exercised for real."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agents.os_agent.harness.launch import read_state
from connectors.desktop.base import Executor
from connectors.model_client import ModelReply
from engine.runtime.request import GenerateRequest, Usage


def _reply(code: str, thought: str = "") -> str:
    return f"## Thought:\n{thought or 'next step'}\n## Action:\n{code}\n## Code:\n```python\n{code}\n```"


class ScreenReadingModel:
    def __init__(self, state_path: Path, screen: tuple[int, int], *, first_replies: list[str] | None = None,
                 json_mode: bool = False) -> None:
        self.state_path, self.screen = Path(state_path), screen
        self.first_replies = list(first_replies or [])  # scripted replies before the policy takes over
        self.json_mode = json_mode
        self.requests: list[GenerateRequest] = []
        self.user_answer: str | None = None

    def frac(self, box: list[int], dx: float = 0.5, dy: float = 0.5) -> tuple[float, float]:
        x = box[0] + (box[2] - box[0]) * dx
        y = box[1] + (box[3] - box[1]) * dy
        return round(x / self.screen[0], 5), round(y / self.screen[1], 5)

    def click(self, name: str, state: dict[str, Any]) -> str:
        x, y = self.frac(state["widgets"][name])
        return f"pyautogui.click(x={x}, y={y})"

    def _fill_then(self, state: dict[str, Any], text: str, button: str, done: bool) -> str:
        if done:
            return "DONE"
        if state.get("name") != text:
            if state.get("focus") != "name":
                return self.click("name", state)
            if state.get("name"):
                return "pyautogui.hotkey('ctrl', 'a')" if state.get("last_key") not in ("a",) else \
                    "pyautogui.press('backspace')"
            return f"pyautogui.write(message={text!r})"
        return self.click(button, state)

    def policy(self, goal: str, state: dict[str, Any]) -> str:
        if "Ada Lovelace" in goal:
            return self._fill_then(state, "Ada Lovelace", "submit", bool(state.get("submitted")))
        if "report 42" in goal:
            return self._fill_then(state, "report 42", "save", bool(state.get("saved")))
        if "agree" in goal:
            return "DONE" if state.get("agree") else self.click("agree", state)
        if "item 30" in goal:
            if int(state.get("items_top", 0)) >= 16:
                return "DONE"
            x, y = self.frac(state["widgets"]["items"])
            return f"pyautogui.scroll(-5, x={x}, y={y})"
        if "square" in goal:
            if int(state["square"][0]) >= 120:
                return "DONE"
            x, y = self.frac(state["widgets"]["square"])
            return f"pyautogui.moveTo(x={x}, y={y})\npyautogui.dragTo(x={round(x + 150 / self.screen[0], 5)}, y={y})"
        if "Password" in goal:  # the secret's placeholder is all the model knows of the password
            if state.get("logged_in_with"):
                return "DONE"
            if not state.get("password"):
                if state.get("focus") != "password":
                    return self.click("password", state)
                ref = goal[goal.index("{{secret:"):goal.index("}}") + 2]
                return f"pyautogui.write(message={ref!r})"
            return self.click("login", state)
        if "ask me" in goal:  # ask the user, then type what they said
            for text in request_texts(self.requests[-1]):
                if "The user answered your question:" in text:
                    self.user_answer = text.split("The user answered your question:", 1)[1].split("\n")[0].strip()
            if state.get("submitted"):
                return "DONE"
            if self.user_answer is None:
                return "call_user(question='Which name should I enter?')"
            if state.get("name") != self.user_answer:
                if state.get("focus") != "name":
                    return self.click("name", state)
                return f"pyautogui.write(message={self.user_answer!r})"
            return self.click("submit", state)
        if "Dangerous" in goal:
            return "DONE" if state.get("dangerous_clicked") else self.click("dangerous", state)
        return "FAIL"

    async def generate(self, request: GenerateRequest) -> ModelReply:
        self.requests.append(request)
        goal = next(str(m["content"]) for m in request.messages if m["role"] == "user")
        if self.first_replies:
            text = self.first_replies.pop(0)
        else:
            text = _reply(self.policy(goal, read_state(self.state_path)))
        if self.json_mode:
            text = json.dumps(to_json_reply(text))
        return ModelReply(text=text, finish_reason="stop", usage=Usage(prompt_tokens=10, completion_tokens=10))


class AppReadingModel:
    """The scripted model of the real-application tasks (``harness.web_tasks``): it "sees" the web page through
    the web app's layout report (element boxes in screen pixels, values, focus) and the desktop apps through
    their window geometry, and answers in Kimi-VL's report format (``Thought/Action/Toolcall``)."""

    def __init__(self, read_state, screen: tuple[int, int], display_env: dict[str, str] | None = None) -> None:
        self.read_state, self.screen, self.display_env = read_state, screen, display_env or {}
        self.requests: list[GenerateRequest] = []

    def frac(self, box: list[int]) -> tuple[float, float]:
        return (round((box[0] + box[2]) / 2 / self.screen[0], 5), round((box[1] + box[3]) / 2 / self.screen[1], 5))

    def click(self, name: str, state: dict[str, Any]) -> str:
        x, y = self.frac(state["widgets"][name])
        return f"click(x={x}, y={y})"

    def fill(self, state: dict[str, Any], field: str, text: str) -> str:
        if state.get("focus") != field:
            return self.click(field, state)
        return f"write(message={text!r})"

    def window_box(self, name: str) -> list[int]:
        import subprocess

        out = subprocess.run(["xdotool", "search", "--onlyvisible", "--name", name, "getwindowgeometry", "--shell"],
                             env=self.display_env, capture_output=True, text=True, timeout=5).stdout
        geo = dict(line.split("=", 1) for line in out.split() if "=" in line)
        x, y, w, h = (int(geo[k]) for k in ("X", "Y", "WIDTH", "HEIGHT"))
        return [x, y, x + w, y + h]

    def policy(self, goal: str, state: dict[str, Any]) -> str:
        page, values = state.get("page"), state.get("values", {})
        if "Sign in" in goal:
            if page == "welcome":
                return "DONE"
            if values.get("user") != "ada":
                return self.fill(state, "user", "ada")
            if not values.get("password"):
                return self.fill(state, "password", goal[goal.index("{{secret:"):goal.index("}}") + 2])
            return self.click("sign_in", state)
        if "Search for" in goal:
            if page == "item":
                return "DONE"
            if "result_0" in state.get("widgets", {}) and values.get("query") == "Kimi-VL":
                return self.click("result_0", state)
            if values.get("query") != "Kimi-VL":
                return self.fill(state, "query", "Kimi-VL")
            return "press('enter')"
        if "notifications" in goal:
            if (state.get("settings") or {}).get("notifications"):
                return "DONE"
            return self.click("save" if values.get("notifications") else "notifications", state)
        if "by price" in goal:
            if (state.get("sort") or {}).get("order", [None])[0] == "Laptop":
                return "DONE"
            return self.click("col_price", state)
        if "report.csv" in goal:
            return "DONE" if state.get("downloads") else self.click("report", state)
        if "editor" in goal:  # click into the text, type, save; the file on disk says whether it worked
            self.editor_stage += 1
            if self.editor_stage == 1:
                box = self.window_box("note.txt")
                x, y = self.frac([box[0], (box[1] + box[3]) // 2, box[2], (box[1] + box[3]) // 2])
                return f"click(x={x}, y={y})"
            return {2: "write(message='hello from kimiray')", 3: "hotkey('ctrl', 's')"}.get(
                self.editor_stage, "DONE" if state.get("file", "").strip() == "hello from kimiray" else "WAIT")
        if "terminal" in goal:
            if self.tried_terminal:
                return "FAIL"
            self.tried_terminal = True
            return "write(message='echo hi\\n')"
        return "FAIL"

    editor_stage = 0
    tried_terminal = False

    async def generate(self, request: GenerateRequest) -> ModelReply:
        self.requests.append(request)
        goal = next(str(m["content"]) for m in request.messages if m["role"] == "user")
        code = self.policy(goal, self.read_state())
        text = f"Thought: next step\nAction: {code}\nToolcall: {code}"
        return ModelReply(text=text, finish_reason="stop", usage=Usage(prompt_tokens=10, completion_tokens=10))


def request_texts(request: GenerateRequest) -> list[str]:
    """Every text part of a model request (what the model was told)."""
    out = []
    for m in request.messages:
        content = m["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out.extend(p.get("text", "") for p in content if p.get("type") == "text")
    return out


def to_json_reply(text: str) -> dict[str, Any]:
    from agents.os_agent.parse import parse_action

    parsed = parse_action(text)
    action: dict[str, Any] = {"kind": parsed.kind}
    if parsed.points:
        action["x"], action["y"] = parsed.points[0]
    if parsed.kind == "drag":
        action["to_x"], action["to_y"] = parsed.points[1]
    action.update({k: v for k, v in parsed.args.items() if k in ("clicks", "text", "keys", "answer", "reason")})
    return {"thought": parsed.thought, "action": action}


@contextmanager
def desktop_host(executor: Executor, token: str | None) -> Iterator[tuple[str, Any]]:
    """``desktop_host_app`` under uvicorn in a thread on a free loopback port; yields (url, server)."""
    import uvicorn

    from connectors.desktop.http import desktop_host_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(desktop_host_app(executor, token), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("desktop host did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(10)
