"""Parsing Kimi-VL's computer-use replies, converting coordinates, the safety policy and the step prompt."""

from __future__ import annotations

import pytest
from PIL import Image

from agents.os_agent.parse import ParseError, parse_action, parse_point, point_to_screen, to_screen
from agents.os_agent.policy import Region, SafetyPolicy, check, chord
from connectors.desktop.actions import Click, Drag, Key, Scroll, TypeText
from connectors.desktop.base import ActionRejected, check_on_screen

SCREEN = (1920, 1080)
IMAGE = (1280, 720)


def _screen(text: str, coordinates: str = "auto"):
    return to_screen(parse_action(text), image_size=IMAGE, screen_size=SCREEN, coordinates=coordinates)


def test_kimi_vl_reply_with_thought_action_and_code_block() -> None:
    reply = ("## Thought:\nThe Save button is at the top right.\n## Action:\nClick Save\n## Code:\n"
             "```python\npyautogui.click(x=0.879, y=0.294)\n```")
    parsed = parse_action(reply)
    assert parsed.kind == "click" and parsed.points == [(0.879, 0.294)]
    assert parsed.thought == "The Save button is at the top right."
    assert _screen(reply) == Click(x=int(0.879 * 1920), y=int(0.294 * 1080))


@pytest.mark.parametrize("code, expected", [
    ("pyautogui.click(0.5, 0.5)", Click(x=960, y=540)),
    ("pyautogui.click(x=0.5, y=0.5, button='right')", {"kind": "right_click", "x": 960, "y": 540}),
    ("pyautogui.click(x=0.5, y=0.5, clicks=2)", {"kind": "double_click", "x": 960, "y": 540}),
    ("pyautogui.doubleClick(x=0.25, y=0.5)", {"kind": "double_click", "x": 480, "y": 540}),
    ("pyautogui.rightClick(x=0.25, y=0.5)", {"kind": "right_click", "x": 480, "y": 540}),
    ("pyautogui.moveTo(x=1.0, y=1.0)", {"kind": "move", "x": 1919, "y": 1079}),
    ("pyautogui.moveTo(0.1, 0.1)\npyautogui.dragTo(0.2, 0.3)", Drag(x=192, y=108, to_x=384, to_y=324)),
    ("pyautogui.moveTo(0.1, 0.1)\npyautogui.mouseDown()\npyautogui.moveTo(0.2, 0.3)\npyautogui.mouseUp()",
     Drag(x=192, y=108, to_x=384, to_y=324)),
    ("pyautogui.dragTo(x=0.2, y=0.3, from_x=0.1, from_y=0.1)", Drag(x=192, y=108, to_x=384, to_y=324)),
    ("pyautogui.scroll(-5, x=0.5, y=0.25)", Scroll(x=960, y=270, clicks=-5)),
    ("pyautogui.scroll(3)", Scroll(x=960, y=540, clicks=3)),
    ("pyautogui.hscroll(2, x=0.5, y=0.5)", Scroll(x=960, y=540, clicks=2, horizontal=True)),
    ("pyautogui.write(message='Hello, World')", TypeText(text="Hello, World")),
    ("pyautogui.typewrite('abc')", TypeText(text="abc")),
    ("pyautogui.press('enter')", Key(keys=["enter"])),
    ("pyautogui.hotkey('ctrl', 'S')", Key(keys=["ctrl", "s"])),
    ("pyautogui.hotkey(keys=['alt', 'f4'])", Key(keys=["alt", "f4"])),
    ("WAIT", {"kind": "wait", "seconds": 2.0}),
    ("time.sleep(0.5)", {"kind": "wait", "seconds": 0.5}),
    ("DONE", {"kind": "done", "answer": ""}),
    ("answer('42 apples')\nDONE", {"kind": "done", "answer": "42 apples"}),
    ("computer.terminate(status='success', answer='ok')", {"kind": "done", "answer": "ok"}),
    ("computer.terminate(status='failure')", {"kind": "fail", "reason": ""}),
    ("FAIL", {"kind": "fail", "reason": ""}),
])
def test_action_forms(code: str, expected) -> None:
    got = _screen(f"```python\n{code}\n```")
    assert got.model_dump() == (expected if isinstance(expected, dict) else expected.model_dump())
    assert _screen(code).model_dump() == got.model_dump()  # bare lines work too


def test_pixel_coordinates_are_pixels_of_the_screenshot_the_model_saw() -> None:
    # 640,360 on the 1280x720 screenshot is the middle of the 1920x1080 screen
    assert _screen("pyautogui.click(x=640, y=360)") == Click(x=960, y=540)
    assert _screen("pyautogui.click(x=640, y=360)", "pixels") == Click(x=960, y=540)
    with pytest.raises(ActionRejected):
        _screen("pyautogui.click(x=640, y=360)", "fraction")


@pytest.mark.parametrize("code", ["pyautogui.click(x=1.5, y=0.2)", "pyautogui.click(x=-0.1, y=0.2)",
                                  "pyautogui.click(x=1280, y=10)", "pyautogui.click(x=10, y=9999)"])
def test_off_screen_points_are_rejected_before_any_executor(code: str) -> None:
    with pytest.raises(ActionRejected, match="off"):
        _screen(code)


@pytest.mark.parametrize("reply, problem", [
    ("I will click the button.", "no action"),
    ("```python\nimport os\nos.system('rm -rf /')\n```", "unknown call"),
    ("```python\npyautogui.click(x=__import__('os'), y=1)\n```", "literal"),
    ("```python\neval('1')\n```", "not an available action"),
    ("```python\npyautogui.click(x=0.5\n```", "not valid Python"),
    ("```python\nx = 1\n```", "only calls"),
    ("```python\npyautogui.click(x=0.5)\n```", "needs x and y"),
    ("```python\npyautogui.click(x='a', y=0.5)\n```", "must be a number"),
    ("```python\npyautogui.click(x=float('nan'), y=0.5)\n```", "literal"),
    ("```python\npyautogui.click(x=0.1, y=0.1, button='middle')\n```", "button"),
    ("```python\npyautogui.dragTo(0.5, 0.5)\n```", "start point"),
    ("```python\npyautogui.scroll(0)\n```", "scroll amount"),
    ("```python\npyautogui.press('not a key')\n```", "not a key name"),
    ("```python\npyautogui.write('')\n```", "non-empty"),
    ("```python\npyautogui.click(*args)\n```", "args"),
    ("```python\nsubprocess.run(['ls'])\n```", "unknown call"),
])
def test_malformed_replies_name_the_problem(reply: str, problem: str) -> None:
    with pytest.raises(ParseError, match=problem):
        parse_action(reply)


# -- the published reply forms ----------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, expected, thought", [
    # Kimi-VL technical report, Fig. 10 (multi-step Chrome task): Thought / Action / Toolcall, no fence, no prefix
    ("Thought: The search bar is at the top of the page.\nAction: Click the search bar.\n"
     "Toolcall: click(x=0.365, y=0.317)", Click(x=int(0.365 * 1920), y=int(0.317 * 1080)),
     "The search bar is at the top of the page."),
    ("Thought: Type the query.\nAction: Type kimi.\nToolcall: pyautogui.write(message='kimi')",
     TypeText(text="kimi"), "Type the query."),
    ("Thought: Submit.\nAction: Press enter.\nToolcall: press('enter')", Key(keys=["enter"]), "Submit."),
    ("Thought: Finished.\nAction: Stop.\nToolcall: DONE", {"kind": "done", "answer": ""}, "Finished."),
    # markdown sections with the code unfenced under ## Code
    ("## Thought:\nThe OK button.\n## Action:\nClick OK\n## Code:\npyautogui.click(x=0.5, y=0.5)\n",
     Click(x=960, y=540), "The OK button."),
    # ... or the call itself under ## Action (no ## Code section)
    ("## Thought:\nScroll the list.\n## Action:\nscroll(-3, x=0.25, y=0.5)", Scroll(x=480, y=540, clicks=-3),
     "Scroll the list."),
    ("## Thought:\nNeed the account.\n## Action:\ncall_user(question='Which account should I use?')",
     {"kind": "ask_user", "question": "Which account should I use?"}, "Need the account."),
])
def test_published_reply_forms_parse_to_the_same_actions(reply: str, expected, thought: str) -> None:
    parsed = parse_action(reply)
    assert parsed.thought == thought
    got = _screen(reply)
    assert (got.model_dump() == expected) if isinstance(expected, dict) else got == expected
    if parsed.points:  # the grounding reader agrees with the action parser
        assert parse_point(reply) == parsed.points[0]


@pytest.mark.parametrize("reply, problem", [
    ("Thought: x\nAction: click it\nToolcall: os.system('id')", "unknown call"),
    ("Thought: x\nToolcall: click(x=__import__('os'), y=1)", "literal"),
    ("## Action:\nClick the OK button", "no action"),  # words under ## Action are not code
    ("## Code:\nimport os; os.system('id')", "no action"),  # an unfenced section must be calls only
    ("Toolcall: call_user()", "question"),
])
def test_published_forms_keep_the_ast_only_rules(reply: str, problem: str) -> None:
    with pytest.raises(ParseError, match=problem):
        parse_action(reply)


def test_the_prompt_teaches_call_user_and_secret_placeholders() -> None:
    from agents.os_agent.convention import system_prompt

    text = system_prompt()
    assert "call_user(question=" in text and "{{secret:name}}" in text


def test_secrets_resolve_redact_and_load_from_the_environment(tmp_path) -> None:
    import json

    from agents.os_agent.secrets import Secrets, UnknownSecret, referenced

    assert referenced("log in with {{secret:crm_password}} then {{ secret:otp }} {{secret:crm_password}}") == [
        "crm_password", "otp"]
    file = tmp_path / "secrets.json"
    file.write_text(json.dumps({"crm_password": "hunter2-Very-Secret"}))
    secrets = Secrets.from_env({"KIMIRAY_OS_SECRETS_FILE": str(file), "KIMIRAY_OS_SECRETS": '{"pin": "4242x"}'})
    assert secrets.names() == {"crm_password", "pin"}
    assert secrets.resolve("pw={{secret:crm_password}}!") == "pw=hunter2-Very-Secret!"
    assert secrets.redact("xdotool failed typing hunter2-Very-Secret and 4242x") == \
        "xdotool failed typing {{secret:crm_password}} and {{secret:pin}}"
    with pytest.raises(UnknownSecret, match="nope"):
        secrets.resolve("{{secret:nope}}")
    for bad in ('[1]', '{"a b": "x"}', '{"a": ""}', 'not json'):
        with pytest.raises(ValueError) as info:
            Secrets.from_env({"KIMIRAY_OS_SECRETS": bad})
        assert "KIMIRAY_OS_SECRETS" in str(info.value)
    with pytest.raises(ValueError, match="can't be read"):
        Secrets.from_env({"KIMIRAY_OS_SECRETS_FILE": str(tmp_path / "missing.json")})


def test_several_calls_yield_the_first_action_and_count_the_rest() -> None:
    parsed = parse_action("pyautogui.click(0.1, 0.1)\npyautogui.write('x')\npyautogui.press('enter')")
    assert parsed.kind == "click" and parsed.dropped == 2


def test_over_long_text_is_a_parse_error_not_a_crash() -> None:
    with pytest.raises(ParseError, match="text"):
        _screen(f"pyautogui.write('{'a' * 5000}')")


def test_thinking_is_ignored_and_grounding_points_parse() -> None:
    assert parse_action("◁think▷pyautogui.click(0.9, 0.9)◁/think▷pyautogui.click(0.1, 0.2)").points == [(0.1, 0.2)]
    assert parse_point("pyautogui.click(x=0.3, y=0.7)") == (0.3, 0.7)
    assert parse_point("The element is at (x=0.25, y=0.5).") == (0.25, 0.5)
    assert parse_point("nothing here") is None
    assert point_to_screen((0.0, 0.0), image_size=IMAGE, screen_size=SCREEN) == (0, 0)


def test_executor_bounds_check() -> None:
    check_on_screen(Drag(x=0, y=0, to_x=1919, to_y=1079), *SCREEN)
    with pytest.raises(ActionRejected):
        check_on_screen(Drag(x=0, y=0, to_x=1920, to_y=5), *SCREEN)


# ------------------------------------------------------------------------------------------------ policy


def test_default_policy_blocks_session_killers_dangerous_text_and_terminal_typing() -> None:
    policy = SafetyPolicy()
    assert not check(policy, Key(keys=["ctrl", "alt", "delete"]), None).allowed
    assert not check(policy, Key(keys=["Alt", "Ctrl", "Del"]), None).allowed
    assert not check(policy, Key(keys=["ctrl", "alt", "backspace"]), None).allowed
    assert not check(policy, TypeText(text="sudo rm -rf /"), "Editor").allowed
    assert not check(policy, TypeText(text="ls"), "user@box: ~ - Terminal").allowed
    assert not check(policy, Key(keys=["enter"]), "xterm").allowed
    assert check(policy, TypeText(text="ls"), "Untitled - Text Editor").allowed
    assert check(SafetyPolicy(allow_terminal_typing=True), TypeText(text="ls"), "xterm").allowed
    assert check(policy, Click(x=1, y=1), "xterm").allowed
    assert chord("Ctrl+Alt+Del") == chord(["alt", "control", "delete"])


def test_policy_allow_list_regions_and_confirmations() -> None:
    policy = SafetyPolicy(allowed_actions=["click"], blocked_regions=[Region(x0=100, y0=100, x1=200, y1=200,
                                                                             name="admin")])
    assert check(policy, Click(x=50, y=50), None).allowed
    assert "admin" in check(policy, Click(x=150, y=150), None).reason
    assert not check(policy, TypeText(text="hi"), None).allowed
    confirm = SafetyPolicy(confirm=["drag", "key:ctrl+s", "text:password"])
    assert check(confirm, Drag(x=1, y=1, to_x=2, to_y=2), None).needs_confirmation
    assert check(confirm, Key(keys=["ctrl", "s"]), None).needs_confirmation
    assert check(confirm, TypeText(text="my Password is"), None).needs_confirmation
    assert not check(confirm, TypeText(text="hello"), None).needs_confirmation
    with pytest.raises(ValueError, match="bad regex"):
        SafetyPolicy(blocked_text=["("])


# ------------------------------------------------------------------------------------------------ prompt


def _record(i: int, status: str = "executed"):
    from agents.os_agent.trajectory import StepRecord

    return StepRecord(index=i, status=status, model_output=f"```python\npyautogui.click({i / 100}, 0.5)\n```",
                      action=Click(x=i, y=5).model_dump(), detail="why" if status != "executed" else "")


def test_step_prompt_keeps_the_last_screenshots_and_summarises_the_rest(tiny_checkpoint) -> None:
    from agents.os_agent.history import PastStep, StepPrompt
    from pipelines.context import TokenCounter

    counter = TokenCounter.from_pretrained(tiny_checkpoint)
    shot = Image.new("RGB", (640, 400), "white")
    past = [PastStep(_record(i, "blocked" if i == 1 else "executed"), shot.copy()) for i in range(6)]
    prompt = StepPrompt(counter=counter, window=100_000, max_tokens=256, goal="press the button",
                        keep_screenshots=3)
    messages, info = prompt.build(past, shot, title="Form", index=6)
    images = [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image"]
    assert len(images) == 3 and info["screenshots"] == 3 and info["summarised"] == 4
    text = str(messages[1]["content"])
    assert "Step 1: click (0,5) -> done" in text and "Step 2: click (1,5) -> blocked (why)" in text
    assert "active window is 'Form'" in str(messages[-1]["content"])
    roles = [m["role"] for m in messages]
    assert all(a != b for a, b in zip(roles, roles[1:]))  # turns alternate
    # a small window: older screenshots shrink, then go, then the summary is cut; the prompt always fits
    small = StepPrompt(counter=counter, window=counter.count_messages(messages[:2]) + 900, max_tokens=256,
                       goal="press the button", keep_screenshots=3)
    messages, info = small.build(past * 4, shot, title=None, index=24)
    assert counter.count_messages(messages) <= small.limit == info["tokens"] or info["tokens"] <= small.limit
    assert info["screenshots"] >= 1


def test_a_recorder_around_the_executor_keeps_secret_placeholders(tmp_path) -> None:
    """The agent fills ``{{secret:name}}`` in only for the executor; a ``TrajectoryRecorder`` wrapped around that
    executor (below the agent) records the placeholder, and the executor still receives the value."""
    import asyncio
    import io

    from PIL import Image

    from agents.os_agent.agent import OSAgentLoop
    from agents.os_agent.secrets import Secrets
    from connectors.desktop.base import ActionOutcome, Observation, Screenshot
    from connectors.desktop.replay import TrajectoryRecorder

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")

    class Desk:
        typed: list[str] = []

        async def observe(self) -> Observation:
            return Observation(screenshot=Screenshot(png=png.getvalue(), width=8, height=8))

        async def screen_size(self) -> tuple[int, int]:
            return 8, 8

        async def execute(self, action) -> ActionOutcome:
            self.typed.append(action.text)
            return ActionOutcome()

        async def close(self) -> None:
            pass

    secret = "s3cr3t-Value-91"
    loop = OSAgentLoop.__new__(OSAgentLoop)  # only the secret filling is exercised here
    loop.secrets = Secrets({"crm_password": secret})
    filled = loop._with_secrets(TypeText(text="pw: {{secret:crm_password}}"))
    recorder = TrajectoryRecorder(Desk())
    asyncio.run(recorder.observe())
    asyncio.run(recorder.execute(filled))
    recorder.save(tmp_path / "trajectory.json")
    saved = (tmp_path / "trajectory.json").read_text()
    assert Desk.typed == [f"pw: {secret}"]
    assert secret not in saved and "{{secret:crm_password}}" in saved
    assert "recordable_text" not in filled.model_dump()  # a helper field only, never part of the wire form
