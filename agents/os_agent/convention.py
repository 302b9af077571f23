"""Kimi-VL's computer-use output convention, and the prompts that ask for it.

What the model emits (confirmed from public sources, 2026-11-26):
- Kimi-VL was evaluated on OSWorld / WindowsAgentArena with screenshot-only input and pyautogui code output,
  the same action language as the Aguvis / OpenCUA trajectory data: a step is free text (thought, action in
  words) followed by code such as ``pyautogui.click(x=0.879, y=0.294)``.
- Coordinates are **fractions of the screenshot's width and height in [0, 1]**, not pixels: the official agentic
  demo multiplies ``x``/``y`` by the original image's width/height (MoonshotAI/Kimi-VL issue #52, which quotes
  that demo; issue #56 reports the same [0, 1] normalisation for boxes; issue #22 prompts ``(x=0.5, y=0.5)``).
  Because they are fractions, downscaling the screenshot before the model sees it changes nothing.
- The Instruct model card's grounding prompt is ``Please observe the screenshot, please locate the following
  elements with action and point.<instruction> [INSTRUCTION]`` (spec §4.4); its answer is one such click.
- OSWorld's special actions end or pause a trajectory: ``WAIT``, ``DONE``, ``FAIL``.
- The Kimi-VL technical report (arXiv 2504.07491, Fig. 10, a multi-step Chrome task) shows each agent step as
  ``Thought: ...`` / ``Action: ...`` (words) / ``Toolcall: click(x=0.365, y=0.317)``: the same calls without the
  ``pyautogui.`` prefix and without a code fence, fractions as coordinates.
- The Aguvis/OpenCUA-style markdown form (our ``REPLY_FORMAT``) has ``## Thought`` / ``## Action`` / ``## Code``
  sections; fine-tunes often drop the ```python fence inside ``## Code``, or put the call itself under
  ``## Action``.
- Handing control to a person: OSWorld's and UI-TARS' ``call_user`` / ``CALL_USER``; we accept
  ``call_user('question')`` (also ``ask_user``), and the task waits for the answer.

We accept, in this order of preference: a ```python code block; ``Toolcall:`` lines; an unfenced ``## Code``
section, else an ``## Action`` section that is itself calls; bare ``pyautogui.*`` lines. Every form goes through
the same ``ast`` parser and action vocabulary, with or without the ``pyautogui.`` prefix. Coordinates in
[0, 1] are fractions; larger whole numbers are read as pixels of the screenshot the model saw (some fine-tunes emit
pixels) unless the task pins ``coordinates``. See ``agents.os_agent.parse``.
"""

from __future__ import annotations

GROUNDING_PROMPT = "Please observe the screenshot, please locate the following elements with action and point."

ACTION_SPACE = """\
You control the computer with exactly one pyautogui call per reply. Coordinates x and y are fractions of the \
screenshot's width and height, between 0 and 1 (x=0 is the left edge, y=0 the top edge).
- pyautogui.click(x=0.5, y=0.5)
- pyautogui.doubleClick(x=0.5, y=0.5)
- pyautogui.rightClick(x=0.5, y=0.5)
- pyautogui.moveTo(x=0.5, y=0.5)
- pyautogui.dragTo(x=0.7, y=0.5, from_x=0.5, from_y=0.5)
- pyautogui.scroll(-5, x=0.5, y=0.5)   (negative scrolls down)
- pyautogui.write(message='text to type')
- pyautogui.press('enter')
- pyautogui.hotkey('ctrl', 's')
- WAIT   (the screen is still changing)
- DONE   (the task is complete; put the answer, if the task asks a question, in answer('...') before it)
- FAIL   (the task cannot be completed)
- call_user(question='...')   (only a person can go on: a choice, a missing detail, a captcha)
Text such as {{secret:name}} in the task stands for a secret: type it exactly like that, e.g. \
pyautogui.write(message='{{secret:name}}'); the real value is filled in when it is typed."""

REPLY_FORMAT = """\
Reply in this format:
## Thought:
what you see and what to do next, in one or two sentences
## Action:
the action in words
## Code:
```python
<one pyautogui call, WAIT, DONE or FAIL>
```"""


def system_prompt(extra_instructions: str = "") -> str:
    text = ("You are a GUI agent. You are given a task and screenshots of the computer screen. Decide the next "
            "action that moves the task forward.\n\n" + ACTION_SPACE + "\n\n" + REPLY_FORMAT)
    return text + (f"\n\n{extra_instructions.strip()}" if extra_instructions.strip() else "")


def correction_prompt(error: str) -> str:
    return (f"Your last reply could not be executed: {error}. Reply again with exactly one action, using the "
            "format above and fractional coordinates between 0 and 1.")


def grounding_prompt(instruction: str) -> str:
    return f"{GROUNDING_PROMPT}<instruction> {instruction}"


# ----------------------------------------------------------------------------------------------- JSON mode
# For engines with guided decoding (ours): the reply is forced into this schema, so it always parses. Kimi-VL was
# trained on the pyautogui form above, so that stays the default; JSON mode trades some accuracy for zero
# malformed steps (and lets the random-weight test checkpoint drive a real desktop).

def _point_props() -> dict:
    unit = {"type": "number", "minimum": 0, "maximum": 1}
    return {"x": unit, "y": unit}


def _kind(name: str, props: dict | None = None) -> dict:
    props = props or {}
    return {"type": "object", "properties": {"kind": {"const": name}, **props},
            "required": ["kind", *props], "additionalProperties": False}


KEY_NAMES = ["enter", "tab", "esc", "backspace", "delete", "space", "up", "down", "left", "right", "home", "end",
             "pageup", "pagedown", "ctrl", "alt", "shift", *[f"f{i}" for i in range(1, 13)],
             *"abcdefghijklmnopqrstuvwxyz0123456789"]


def action_json_schema() -> dict:
    text = {"type": "string", "minLength": 1, "maxLength": 100}
    return {
        "type": "object",
        "properties": {
            "thought": {"type": "string", "maxLength": 120},
            "action": {"anyOf": [
                _kind("click", _point_props()), _kind("double_click", _point_props()),
                _kind("right_click", _point_props()), _kind("move", _point_props()),
                _kind("drag", {**_point_props(), "to_x": {"type": "number", "minimum": 0, "maximum": 1},
                               "to_y": {"type": "number", "minimum": 0, "maximum": 1}}),
                _kind("scroll", {**_point_props(), "clicks": {"type": "integer", "minimum": -10, "maximum": 10}}),
                _kind("type", {"text": text}),
                _kind("key", {"keys": {"type": "array", "items": {"enum": KEY_NAMES}, "minItems": 1, "maxItems": 3}}),
                _kind("wait"), _kind("done", {"answer": {"type": "string", "maxLength": 500}}),
                _kind("fail", {"reason": {"type": "string", "maxLength": 500}}),
            ]},
        },
        "required": ["thought", "action"],
        "additionalProperties": False,
    }


JSON_REPLY_FORMAT = """\
Reply with one JSON object: {"thought": "...", "action": {"kind": ..., ...}}. Kinds: click / double_click / \
right_click / move {x, y}; drag {x, y, to_x, to_y}; scroll {x, y, clicks} (negative scrolls down); type {text}; \
key {keys: ["ctrl", "s"]}; wait; done {answer}; fail {reason}. x and y are fractions of the screenshot's width \
and height, between 0 and 1."""


def json_system_prompt(extra_instructions: str = "") -> str:
    text = ("You are a GUI agent. You are given a task and screenshots of the computer screen. Decide the next "
            "action that moves the task forward.\n\n" + JSON_REPLY_FORMAT)
    return text + (f"\n\n{extra_instructions.strip()}" if extra_instructions.strip() else "")
