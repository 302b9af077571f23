"""Desktop executors against a real X server: Xvfb + xdotool + a Tk app that reports its own state.

Every assertion is on what the app saw (its state file) or on the real screen, never on what we sent.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from agents.os_agent.harness.launch import launch_app, read_state, stop_app, wait_state
from connectors.desktop.actions import (
    Click, DoubleClick, Done, Drag, Fail, Key, Move, RightClick, Scroll, TypeText, Wait,
)
from connectors.desktop.base import ActionRejected, Executor, ExecutorError
from connectors.desktop.http import HttpExecutor
from connectors.desktop.registry import (
    HttpDesktopSpec, ReplayDesktopSpec, X11DesktopSpec, desktops_from_env, open_executor,
)
from connectors.desktop.replay import RecordedTrajectory, ReplayExecutor, TrajectoryRecorder
from connectors.desktop.x11 import X11Executor, x11_keysym, xdotool_chord
from connectors.desktop.xvfb import VirtualDisplay, XvfbError
from tests.os_agent_helpers import desktop_host

_MISSING = [b for b in ("Xvfb", "xdotool") if shutil.which(b) is None]
if importlib.util.find_spec("tkinter") is None:
    _MISSING.append("tkinter")
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"needs {', '.join(_MISSING)} "
                                "(apt-get install xvfb xdotool python3-tk; scripts/test.sh does it)")

W, H = 1024, 768
TITLE = "KimiRay Test App"
TOKEN = "s3cret-token"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def center(box: list[int]) -> tuple[int, int]:
    x0, y0, x1, y1 = box
    return (x0 + x1) // 2, (y0 + y1) // 2


def pointer(display: VirtualDisplay) -> tuple[int, int]:
    import subprocess

    out = subprocess.run(["xdotool", "getmouselocation", "--shell"], env=display.env(), capture_output=True,
                         text=True, timeout=5, check=True).stdout
    values = dict(line.split("=", 1) for line in out.split())
    return int(values["X"]), int(values["Y"])


# -- fixtures -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def display() -> Iterator[VirtualDisplay]:
    with VirtualDisplay(W, H) as vd:
        yield vd


@pytest.fixture(scope="module")
def x11(display: VirtualDisplay) -> X11Executor:
    return X11Executor(display.display, action_delay_s=0.02, command_timeout_s=10)


class App:
    """The running Tk app: its state file and widget boxes."""

    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self.initial = read_state(state_path)

    @property
    def state(self) -> dict[str, Any]:
        return read_state(self.state_path)

    def box(self, name: str) -> list[int]:
        return self.initial["widgets"][name]

    def center(self, name: str) -> tuple[int, int]:
        return center(self.box(name))

    def wait(self, predicate, timeout_s: float = 5.0) -> dict[str, Any]:
        return wait_state(self.state_path, predicate, timeout_s)


@pytest.fixture()
def app(display: VirtualDisplay, tmp_path: Path) -> Iterator[App]:
    proc = launch_app(display.env(), tmp_path / "state.json", x=20, y=30)
    try:
        yield App(tmp_path / "state.json")
    finally:
        stop_app(proc)


def click_entry(x11: Executor, app: App) -> None:
    x, y = app.center("name")
    run(x11.execute(Click(x=x, y=y)))
    app.wait(lambda s: s["focus"] == "name")


@pytest.fixture(scope="module")
def host(x11: X11Executor) -> Iterator[str]:
    with desktop_host(x11, TOKEN) as (url, _server):
        yield url


# -- X11: observe -------------------------------------------------------------------------------------------------
def test_observe_returns_png_of_screen_size_and_title(x11: X11Executor, app: App) -> None:
    obs = run(x11.observe())
    assert obs.screenshot.png.startswith(b"\x89PNG\r\n\x1a\n")
    assert (obs.screenshot.width, obs.screenshot.height) == (W, H)
    assert Image.open(io.BytesIO(obs.screenshot.png)).size == (W, H)
    assert obs.window_title == TITLE
    assert obs.taken_s > 0
    assert run(x11.screen_size()) == (W, H)


def test_screenshot_pixels_change_after_typing(x11: X11Executor, app: App) -> None:
    box = app.box("name")
    before = run(x11.observe()).screenshot.image().crop(box)
    click_entry(x11, app)
    run(x11.execute(TypeText(text="WWWWWWWW")))
    app.wait(lambda s: s["name"] == "WWWWWWWW")
    after = run(x11.observe()).screenshot.image().crop(box)
    changed = int((np.asarray(before.convert("RGB")) != np.asarray(after.convert("RGB"))).any(-1).sum())
    assert changed > 50, f"only {changed} pixels of the entry changed"


# -- X11: keyboard ------------------------------------------------------------------------------------------------
def test_click_entry_then_type(x11: X11Executor, app: App) -> None:
    click_entry(x11, app)
    outcome = run(x11.execute(TypeText(text="Hello World")))
    assert outcome.ok and outcome.duration_s > 0
    state = app.wait(lambda s: s["name"] == "Hello World")
    assert state["focus"] == "name" and state["last_key"] == "d"


def test_ctrl_a_then_type_replaces_and_backspace(x11: X11Executor, app: App) -> None:
    click_entry(x11, app)
    run(x11.execute(TypeText(text="old text")))
    app.wait(lambda s: s["name"] == "old text")
    run(x11.execute(Key(keys=["ctrl", "a"])))
    run(x11.execute(TypeText(text="new")))
    app.wait(lambda s: s["name"] == "new")
    run(x11.execute(Key(keys=["backspace"])))
    state = app.wait(lambda s: s["name"] == "ne")
    assert state["last_key"] == "BackSpace"
    run(x11.execute(Key(keys=["/"])))  # punctuation goes through its keysym name (xdotool ignores "/")
    app.wait(lambda s: s["name"] == "ne/")


def test_unknown_key_is_rejected_before_anything_runs(x11: X11Executor, app: App) -> None:
    click_entry(x11, app)
    run(x11.execute(TypeText(text="keep")))
    app.wait(lambda s: s["name"] == "keep")
    with pytest.raises(ActionRejected, match="hyperspace"):
        run(x11.execute(Key(keys=["backspace", "hyperspace"])))
    time.sleep(0.2)
    assert app.state["name"] == "keep"  # the valid backspace in the chord was not pressed either


def test_key_name_mapping() -> None:
    assert xdotool_chord(["ctrl", "shift", "esc"]) == "ctrl+shift+Escape"
    assert xdotool_chord(["Enter"]) == "Return"
    assert [x11_keysym(k) for k in ("pageup", "pgdn", "win", "cmd", "f12", "del", "space", "A", "7", "+")] == \
        ["Prior", "Next", "super", "super", "F12", "Delete", "space", "A", "7", "plus"]
    assert x11_keysym("é") == "U00E9"
    for bad in ("hyperspace", "ctrl+a", "\x00", ""):
        with pytest.raises(ActionRejected):
            x11_keysym(bad)


# -- X11: pointer -------------------------------------------------------------------------------------------------
def test_submit_and_checkbox(x11: X11Executor, app: App) -> None:
    click_entry(x11, app)
    run(x11.execute(TypeText(text="Ada")))
    app.wait(lambda s: s["name"] == "Ada")
    run(x11.execute(Click(x=app.center("submit")[0], y=app.center("submit")[1])))
    state = app.wait(lambda s: s["submitted"])
    assert state["submitted_name"] == "Ada"
    x, y = app.center("agree")
    run(x11.execute(Click(x=x, y=y)))
    app.wait(lambda s: s["agree"] is True)
    run(x11.execute(Click(x=x, y=y)))
    app.wait(lambda s: s["agree"] is False)
    assert not app.state["dangerous_clicked"]


def test_save_button_writes_file(x11: X11Executor, app: App) -> None:
    click_entry(x11, app)
    run(x11.execute(TypeText(text="saved text!")))
    app.wait(lambda s: s["name"] == "saved text!")
    x, y = app.center("save")
    run(x11.execute(Click(x=x, y=y)))
    state = app.wait(lambda s: s["saved"])
    assert Path(state["save_path"]).read_text() == "saved text!"


def test_double_click_and_right_click(x11: X11Executor, app: App) -> None:
    x0, y0, x1, _ = app.box("items")
    run(x11.execute(DoubleClick(x=(x0 + x1) // 2, y=y0 + 10)))
    app.wait(lambda s: s["double_clicked_item"] == "item 00")
    x, y = app.center("canvas")
    run(x11.execute(RightClick(x=x, y=y)))
    app.wait(lambda s: s["right_clicks"] == [[x, y]])


def test_scroll_listbox(x11: X11Executor, app: App) -> None:
    x, y = app.center("items")
    run(x11.execute(Scroll(x=x, y=y, clicks=-3)))
    down = app.wait(lambda s: s["items_top"] > 0)["items_top"]
    run(x11.execute(Scroll(x=x, y=y, clicks=1)))
    app.wait(lambda s: s["items_top"] < down)
    run(x11.execute(Scroll(x=x, y=y, clicks=2, horizontal=True)))  # no horizontal view here: must not fail


def test_drag_square(x11: X11Executor, app: App) -> None:
    sx, sy = app.initial["square"]
    x, y = app.center("square")
    run(x11.execute(Drag(x=x, y=y, to_x=x + 120, to_y=y + 70)))
    state = app.wait(lambda s: s["square"] != [sx, sy])
    nx, ny = state["square"]
    assert abs(nx - sx - 120) <= 2 and abs(ny - sy - 70) <= 2, state["square"]


def test_move_twice_to_same_point_does_not_hang(x11: X11Executor, display: VirtualDisplay, app: App) -> None:
    start = time.monotonic()
    for _ in range(2):  # xdotool's --sync would wait forever here
        run(x11.execute(Move(x=300, y=200)))
    assert pointer(display) == (300, 200)
    assert time.monotonic() - start < 3


def test_wait_sleeps(x11: X11Executor) -> None:
    outcome = run(x11.execute(Wait(seconds=0.1)))
    assert outcome.ok and 0.1 <= outcome.duration_s < 1.0


# -- X11: refusals and failures -----------------------------------------------------------------------------------
def test_off_screen_is_rejected_and_nothing_happens(x11: X11Executor, display: VirtualDisplay, app: App) -> None:
    run(x11.execute(Move(x=5, y=5)))
    sx, sy = app.center("square")
    for action in (Click(x=W, y=10), DoubleClick(x=10, y=H + 5), Drag(x=sx, y=sy, to_x=W + 100, to_y=sy),
                   Scroll(x=5000, y=5, clicks=-3)):
        with pytest.raises(ActionRejected, match="off the 1024x768 screen"):
            run(x11.execute(action))
    assert pointer(display) == (5, 5)
    time.sleep(0.1)
    assert app.state["square"] == app.initial["square"]


def test_terminal_actions_are_rejected(x11: X11Executor) -> None:
    for action in (Done(answer="42"), Fail(reason="stuck")):
        with pytest.raises(ActionRejected, match="terminal"):
            run(x11.execute(action))


def test_virtual_display_lifecycle() -> None:
    with pytest.raises(XvfbError, match="apt-get install xvfb"):
        VirtualDisplay(xvfb="no-such-Xvfb-binary").start()
    with VirtualDisplay(320, 200) as vd:
        assert vd.running and vd.env()["DISPLAY"] == vd.display and vd.display.startswith(":")
    assert not vd.running


def test_dead_display_is_an_executor_error_not_a_hang() -> None:
    vd = VirtualDisplay(320, 240).start()
    warm = X11Executor(vd.display, command_timeout_s=3)
    assert run(warm.screen_size()) == (320, 240)  # cached: the click itself must notice
    cold = X11Executor(vd.display, command_timeout_s=3)
    vd.close()
    start = time.monotonic()
    with pytest.raises(ExecutorError, match=vd.display):
        run(warm.execute(Click(x=10, y=10)))
    with pytest.raises(ExecutorError):
        run(cold.execute(Click(x=10, y=10)))
    with pytest.raises(ExecutorError):
        run(warm.observe())
    assert time.monotonic() - start < 9


# -- HTTP ---------------------------------------------------------------------------------------------------------
def test_http_click_type_observe(host: str, app: App) -> None:
    remote = HttpExecutor(host, token=TOKEN, timeout_s=10)
    assert run(remote.screen_size()) == (W, H)
    x, y = app.center("name")

    async def act() -> Any:
        await remote.execute(Click(x=x, y=y))
        await remote.execute(TypeText(text="via http"))
        obs = await remote.observe()
        await remote.close()
        return obs

    obs = run(act())
    app.wait(lambda s: s["name"] == "via http")
    assert Image.open(io.BytesIO(obs.screenshot.png)).size == (W, H)
    assert obs.window_title == TITLE


def test_http_requires_the_token(host: str) -> None:
    assert httpx.get(f"{host}/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        resp = httpx.get(f"{host}/v1/screen", headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
        assert httpx.post(f"{host}/v1/execute", json={"kind": "wait", "seconds": 0}, headers=headers).status_code \
            == 401
    with pytest.raises(ExecutorError, match="401"):
        run(HttpExecutor(host, token="wrong").observe())


def test_http_tokens_never_reach_errors_or_logs(host: str, caplog: pytest.LogCaptureFixture) -> None:
    """A client's token (wrong here, so the host answers 401) and the host's own token stay out of every error
    message, repr and log line, at DEBUG, also when the host is unreachable."""
    caplog.set_level(logging.DEBUG)
    mine = "sk-desktop-leak-check-7f3a"
    texts = []
    for url in (host, "http://127.0.0.1:9"):
        remote = HttpExecutor(url, token=mine, timeout_s=3)
        with pytest.raises(ExecutorError) as info:
            run(remote.observe())
        texts += [str(info.value), repr(info.value), repr(remote)]
    texts.append(caplog.text)
    for text in texts:
        assert mine not in text and TOKEN not in text, text


def test_http_rejections(host: str, display: VirtualDisplay) -> None:
    remote = HttpExecutor(host, token=TOKEN, timeout_s=10)
    run(remote.execute(Move(x=7, y=7)))
    with pytest.raises(ActionRejected, match="off the"):
        run(remote.execute(Click(x=W + 1, y=1)))
    with pytest.raises(ActionRejected, match="unknown key"):
        run(remote.execute(Key(keys=["warp"])))
    with pytest.raises(ActionRejected, match="terminal"):
        run(remote.execute(Done()))
    assert pointer(display) == (7, 7)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    resp = httpx.post(f"{host}/v1/execute", json={"kind": "click", "x": -1, "y": 3}, headers=auth)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_request"
    resp = httpx.post(f"{host}/v1/execute", json={"kind": "click", "x": W + 5, "y": 3}, headers=auth)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "action_rejected"


def test_http_host_executor_errors_are_502(display: VirtualDisplay) -> None:
    vd = VirtualDisplay(320, 240).start()
    broken = X11Executor(vd.display, command_timeout_s=3)
    vd.close()
    with desktop_host(broken, None) as (url, _server):
        resp = httpx.post(f"{url}/v1/execute", json={"kind": "click", "x": 1, "y": 1})
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "executor_error"
        with pytest.raises(ExecutorError, match="502"):
            run(HttpExecutor(url).observe())


def test_http_stopped_host_is_an_executor_error(x11: X11Executor) -> None:
    with desktop_host(x11, TOKEN) as (url, _server):
        remote = HttpExecutor(url, token=TOKEN, timeout_s=3)
        assert run(remote.screen_size()) == (W, H)
    start = time.monotonic()
    with pytest.raises(ExecutorError, match="unreachable"):
        run(remote.execute(Move(x=1, y=1)))
    with pytest.raises(ExecutorError):
        run(remote.observe())
    assert time.monotonic() - start < 5


# -- replay -------------------------------------------------------------------------------------------------------
def test_record_then_replay(x11: X11Executor, app: App, tmp_path: Path) -> None:
    recorder = TrajectoryRecorder(x11, meta={"task": "type a name"})
    x, y = app.center("name")
    click, typing = Click(x=x, y=y), TypeText(text="rec")

    async def record() -> None:
        await recorder.observe()
        await recorder.execute(click)
        await recorder.execute(typing)  # no observe in between: the recorder takes one itself
        with pytest.raises(ActionRejected):
            await recorder.execute(Click(x=W + 1, y=0))  # rejected: not recorded
        await recorder.observe()

    run(record())
    app.wait(lambda s: s["name"] == "rec")
    path = tmp_path / "trajectory.json"
    recorder.save(path)
    raw = json.loads(path.read_text())
    assert [s["action"] and s["action"]["kind"] for s in raw["steps"]] == ["click", "type", None]
    assert isinstance(raw["steps"][0]["png"], str) and raw["meta"]["task"] == "type a name"
    recorded = RecordedTrajectory.load(path)

    strict = ReplayExecutor(path, strict=True)

    async def replay_strict() -> None:
        first = await strict.observe()
        assert first.screenshot.png == recorded.steps[0].png and first.window_title == TITLE
        assert await strict.screen_size() == (W, H)
        with pytest.raises(ActionRejected, match="x: expected"):
            await strict.execute(Click(x=x + 3, y=y))
        with pytest.raises(ActionRejected, match="kind: expected click, got double_click"):
            await strict.execute(DoubleClick(x=x, y=y))
        with pytest.raises(ActionRejected, match="off the"):
            await strict.execute(Click(x=W, y=y))
        await strict.execute(click)
        assert (await strict.observe()).screenshot.png == recorded.steps[1].png
        with pytest.raises(ActionRejected, match="text: expected 'rec'"):
            await strict.execute(TypeText(text="other"))
        await strict.execute(typing)
        final = await strict.observe()
        assert final.screenshot.png == recorded.steps[2].png
        with pytest.raises(ExecutorError, match="exhausted"):
            await strict.execute(Wait(seconds=0))

    run(replay_strict())
    assert strict.mismatches == [] and strict.executed == [click, typing]

    loose = ReplayExecutor(raw, tolerance_px=2)

    async def replay_loose() -> None:
        await loose.execute(Click(x=x + 2, y=y - 1))  # within tolerance
        await loose.execute(TypeText(text="other"))  # noted, not refused
        await loose.observe()
        with pytest.raises(ExecutorError, match="exhausted"):
            await loose.execute(Wait(seconds=0))

    run(replay_loose())
    assert [(m.step, m.difference) for m in loose.mismatches] == [(1, "text: expected 'rec', got 'other'")]

    short = ReplayExecutor({"steps": [raw["steps"][0]]})
    run(short.execute(click))
    with pytest.raises(ExecutorError, match="exhausted"):
        run(short.observe())


# -- registry -----------------------------------------------------------------------------------------------------
def test_desktops_from_env_defaults() -> None:
    assert desktops_from_env({}) == {}
    assert desktops_from_env({"DISPLAY": ":7"}) == {"local": X11DesktopSpec(display=":7")}
    assert desktops_from_env({"DISPLAY": ":7.0", "KIMIRAY_DESKTOPS": "  "}) == \
        {"local": X11DesktopSpec(display=":7.0")}
    assert desktops_from_env({"DISPLAY": "localhost:10.0"}) == {}  # ssh-forwarded: not offered
    assert desktops_from_env({"DISPLAY": ":7", "KIMIRAY_DESKTOPS": "{}"}) == {}


def test_desktops_from_env_config() -> None:
    config = {"vm": {"kind": "http", "url": "https://desk.example:8700/", "token_env": "DESK_TOKEN"},
              "main": {"kind": "x11", "display": ":3"},
              "golden": {"kind": "replay", "path": "/data/t.json", "strict": True}}
    desktops = desktops_from_env({"DISPLAY": ":0", "KIMIRAY_DESKTOPS": json.dumps(config)})
    assert desktops == {"vm": HttpDesktopSpec(url="https://desk.example:8700", token_env="DESK_TOKEN"),
                        "main": X11DesktopSpec(display=":3"),
                        "golden": ReplayDesktopSpec(path="/data/t.json", strict=True)}


@pytest.mark.parametrize("raw, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"a": {"kind": "x11", "display": "evil.example:0"}}', "a.x11.display"),
    ('{"a": {"kind": "vnc", "host": "x"}}', "a"),
    ('{"a": {"kind": "http", "url": "file:///etc/passwd"}}', "http(s) URL"),
    ('{"a": {"kind": "http", "url": "http://h", "token": "inline-secret"}}', "token"),
    ('{"bad name!": {"kind": "x11", "display": ":1"}}', "bad name!"),
])
def test_desktops_from_env_rejects_bad_config(raw: str, needle: str) -> None:
    with pytest.raises(ValueError, match="KIMIRAY_DESKTOPS") as info:
        desktops_from_env({"KIMIRAY_DESKTOPS": raw})
    assert needle in str(info.value)


def test_open_executor_reads_the_token_at_open_time(tmp_path: Path) -> None:
    spec = HttpDesktopSpec(url="http://127.0.0.1:9", token_env="DESK_TOKEN")
    assert "tok-123" not in spec.model_dump_json()
    remote = open_executor(spec, {"DESK_TOKEN": "tok-123"})
    assert isinstance(remote, HttpExecutor) and remote._headers == {"Authorization": "Bearer tok-123"}
    with pytest.raises(ValueError, match="DESK_TOKEN"):
        open_executor(spec, {})
    assert isinstance(open_executor(X11DesktopSpec(display=":3")), X11Executor)
    path = tmp_path / "t.json"
    png = io.BytesIO()
    Image.new("RGB", (4, 3)).save(png, format="PNG")
    RecordedTrajectory.from_dict({"steps": [{"png": png.getvalue(), "width": 4, "height": 3}]}).save(path)
    replay = open_executor(ReplayDesktopSpec(path=str(path)))
    assert isinstance(replay, ReplayExecutor) and run(replay.screen_size()) == (4, 3)


# -- host CLI -----------------------------------------------------------------------------------------------------
def test_host_cli_refuses_unsafe_setups(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from connectors.desktop.host_cli import main

    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    assert main(["--display", ":0", "--token-env", "NO_SUCH_TOKEN_VAR"]) == 2
    assert main(["--display", ":0", "--host", "0.0.0.0"]) == 2
    assert "without --token-env" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--display", "remote:0"])

