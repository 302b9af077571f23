"""Model output -> one action, without ever evaluating the model's code.

The reply's code (a ```python block, else bare ``pyautogui.*`` / ``WAIT`` / ``DONE`` / ``FAIL`` lines) is parsed
with ``ast``; only calls of known names with literal arguments are understood, everything else is a
``ParseError`` naming the problem (the agent re-prompts once with it). A reply with several calls yields its first
action (a ``moveTo`` + ``dragTo`` or ``mouseDown``/``mouseUp`` pair folds into one drag); the rest is reported as
dropped, since the agent acts once and looks again.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from connectors.desktop.actions import (AskUser, Click, Done, DoubleClick, Drag, Fail, Key, Move, RightClick,
                                        Scroll, TypeText, Wait)
from connectors.desktop.base import ActionRejected

CoordinateMode = Literal["auto", "fraction", "pixels"]
DEFAULT_WAIT_S = 2.0
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S | re.I)
_CODE_LINE = re.compile(r"^\s*(?:pyautogui\.|computer\.|time\.sleep|answer\s*\(|call_user\s*\(|(?:WAIT|DONE|FAIL)\b)", re.M)
_THINK = re.compile(r"◁think▷.*?◁/think▷", re.S)
_THOUGHT = re.compile(r"##\s*Thought:?\s*(.*?)(?:\n##|\Z)", re.S | re.I)
# Kimi-VL technical report, Fig. 10: "Thought: ...\nAction: ...\nToolcall: click(x=0.365, y=0.317)"
_PLAIN_THOUGHT = re.compile(r"^\s*Thought:\s*(.*?)(?=^\s*(?:Action|Toolcall):|\Z)", re.S | re.I | re.M)
_TOOLCALL = re.compile(r"^\s*Toolcall:\s*(.+?)\s*$", re.M | re.I)
# "## Code:" / "## Action:" sections whose body is code without a ``` fence
_SECTION = re.compile(r"^\s*##\s*(Code|Action):?[ \t]*\n?(.*?)(?=^\s*##|\Z)", re.S | re.I | re.M)
_KEY_NAME = re.compile(r"^[a-z0-9]+$|^[^\sa-z0-9]$")


class ParseError(ValueError):
    """The reply holds no executable action; the message says why (it is shown to the model)."""


@dataclass
class ParsedAction:
    """An action in the model's coordinate space (see ``to_screen``)."""

    kind: str
    points: list[tuple[float, float]] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)
    code: str = ""
    dropped: int = 0  # further calls in the reply that were not executed
    thought: str = ""


@dataclass
class _Call:
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    source: str


def _parses_as_calls(code: str) -> bool:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    return bool(tree.body) and all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Call | ast.Name)
                                   for s in tree.body)


def extract_code(text: str) -> str:
    """The reply's code, in this order: the last ```python block; ``Toolcall:`` lines (Kimi-VL's report); an
    unfenced ``## Code`` section, else an ``## Action`` section that is itself code; bare pyautogui/WAIT/DONE
    lines. Sections count only when their whole body parses as calls, so "## Action: click the OK button"
    (words) is never mistaken for code."""
    text = _THINK.sub("", text)
    blocks = _CODE_BLOCK.findall(text)
    if blocks:
        return blocks[-1].strip()
    toolcalls = _TOOLCALL.findall(text)
    if toolcalls:
        return "\n".join(t.strip() for t in toolcalls)
    sections = {name.lower(): body.strip() for name, body in _SECTION.findall(text)}
    for name in ("code", "action"):
        body = sections.get(name, "")
        if body and _parses_as_calls(body):
            return body
    return "\n".join(line.strip() for line in text.splitlines() if _CODE_LINE.match(line)).strip()


def _literal(node: ast.AST, source: str) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ParseError(f"arguments must be literal values, got {ast.get_source_segment(source, node)!r}") from None


def _calls(code: str) -> list[_Call]:
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise ParseError(f"the code is not valid Python ({exc.msg})") from None
    calls: list[_Call] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            continue
        if not isinstance(stmt, ast.Expr):
            raise ParseError(f"only calls are allowed, got {ast.get_source_segment(code, stmt)!r}")
        node = stmt.value
        if isinstance(node, ast.Name) and node.id in ("WAIT", "DONE", "FAIL"):
            calls.append(_Call(node.id, [], {}, node.id))
            continue
        if not isinstance(node, ast.Call):
            raise ParseError(f"only calls are allowed, got {ast.get_source_segment(code, node)!r}")
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in (
                "pyautogui", "computer", "time"):
            name = f"{func.value.id}.{func.attr}" if func.value.id == "time" else func.attr
        elif isinstance(func, ast.Name):
            name = func.id
        else:
            raise ParseError(f"unknown call {ast.get_source_segment(code, func)!r}")
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise ParseError("*args / **kwargs are not allowed")
        calls.append(_Call(name, [_literal(a, code) for a in node.args],
                           {k.arg: _literal(k.value, code) for k in node.keywords if k.arg},
                           ast.get_source_segment(code, node) or name))
    return calls


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ParseError(f"{what} must be a number, got {value!r}")
    return float(value)


def _point(call: _Call, required: bool = True) -> tuple[float, float] | None:
    x = call.kwargs.get("x", call.args[0] if len(call.args) > 0 else None)
    y = call.kwargs.get("y", call.args[1] if len(call.args) > 1 else None)
    if isinstance(x, list | tuple) and len(x) == 2 and y is None:  # click((0.1, 0.2))
        x, y = x
    if x is None or y is None:
        if required:
            raise ParseError(f"{call.name} needs x and y")
        return None
    return _number(x, "x"), _number(y, "y")


def _keys(values: list[Any]) -> list[str]:
    keys = []
    for value in values:
        if not isinstance(value, str) or not value:
            raise ParseError(f"key names must be strings, got {value!r}")
        name = value.strip().lower() if len(value) > 1 else value
        if not _KEY_NAME.match(name.lower()):
            raise ParseError(f"{value!r} is not a key name")
        keys.append(name)
    if not keys:
        raise ParseError("no key given")
    if len(keys) > 6:
        raise ParseError("at most 6 keys in a chord")
    return [k.lower() for k in keys] if len(keys) > 1 else keys  # ctrl+S is ctrl+s; a lone "A" types "A"


_POINTER = {"click": "click", "leftClick": "click", "doubleClick": "double_click", "double_click": "double_click",
            "rightClick": "right_click", "right_click": "right_click", "moveTo": "move", "move_to": "move"}


def _action(calls: list[_Call], i: int) -> tuple[ParsedAction, int]:
    """The action starting at ``calls[i]`` and how many calls it used."""
    call = calls[i]
    name = call.name
    if name in _POINTER:
        kind = _POINTER[name]
        point = _point(call)
        if kind == "click":
            button = call.kwargs.get("button", "left")
            clicks = call.kwargs.get("clicks", 1)
            if button == "right":
                kind = "right_click"
            elif button != "left":
                raise ParseError(f"button {button!r} is not supported (left or right)")
            if clicks == 2:
                kind = "double_click" if kind == "click" else kind
            elif clicks != 1:
                raise ParseError("clicks must be 1 or 2")
        if kind == "move":  # moveTo + dragTo, or moveTo + mouseDown + moveTo + mouseUp: one drag
            rest = [c.name for c in calls[i + 1:i + 4]]
            if rest[:1] == ["dragTo"]:
                end = _point(calls[i + 1])
                return ParsedAction("drag", [point, end], code=f"{call.source}; {calls[i + 1].source}"), 2
            if rest[:3] == ["mouseDown", "moveTo", "mouseUp"]:
                end = _point(calls[i + 2])
                return ParsedAction("drag", [point, end], code="; ".join(c.source for c in calls[i:i + 4])), 4
        return ParsedAction(kind, [point], code=call.source), 1
    if name == "dragTo":
        end = _point(call)
        fx, fy = call.kwargs.get("from_x"), call.kwargs.get("from_y")
        if fx is None or fy is None:
            raise ParseError("dragTo needs a start point: moveTo(x=..., y=...) first, or from_x= and from_y=")
        return ParsedAction("drag", [(_number(fx, "from_x"), _number(fy, "from_y")), end], code=call.source), 1
    if name in ("scroll", "hscroll", "vscroll"):
        clicks = call.kwargs.get("clicks", call.args[0] if call.args else None)
        amount = _number(clicks, "scroll amount")
        if amount != int(amount) or not -50 <= amount <= 50 or amount == 0:
            raise ParseError("scroll amount must be a whole number between -50 and 50, not 0")
        x = call.kwargs.get("x", call.args[1] if len(call.args) > 1 else None)
        y = call.kwargs.get("y", call.args[2] if len(call.args) > 2 else None)
        point = (0.5, 0.5) if x is None or y is None else (_number(x, "x"), _number(y, "y"))
        return ParsedAction("scroll", [point], {"clicks": int(amount), "horizontal": name == "hscroll"},
                            code=call.source), 1
    if name in ("write", "typewrite", "type", "type_text"):
        text = call.kwargs.get("message", call.kwargs.get("text", call.args[0] if call.args else None))
        if isinstance(text, list) and all(isinstance(k, str) for k in text) and name == "typewrite":
            text = "".join(k if len(k) == 1 else "" for k in text) or None
        if not isinstance(text, str) or not text:
            raise ParseError(f"{name} needs a non-empty text")
        return ParsedAction("type", args={"text": text}, code=call.source), 1
    if name == "press":
        keys = call.kwargs.get("keys", call.args[0] if call.args else None)
        keys = keys if isinstance(keys, list) else [keys]
        if len(keys) != 1:
            raise ParseError("press takes one key; use hotkey('ctrl', 'c') for chords")
        return ParsedAction("key", args={"keys": _keys(keys)}, code=call.source), 1
    if name == "hotkey":
        keys = call.kwargs.get("keys", list(call.args))
        return ParsedAction("key", args={"keys": _keys(keys if isinstance(keys, list) else [keys])},
                            code=call.source), 1
    if name in ("WAIT", "wait", "time.sleep"):
        seconds = call.kwargs.get("seconds", call.args[0] if call.args else DEFAULT_WAIT_S)
        return ParsedAction("wait", args={"seconds": min(max(_number(seconds, "seconds"), 0.0), 60.0)},
                            code=call.source), 1
    if name in ("DONE", "done", "finished"):
        answer = call.kwargs.get("answer", call.kwargs.get("content", call.args[0] if call.args else ""))
        return ParsedAction("done", args={"answer": str(answer)}, code=call.source), 1
    if name in ("FAIL", "fail"):
        reason = call.kwargs.get("reason", call.args[0] if call.args else "")
        return ParsedAction("fail", args={"reason": str(reason)}, code=call.source), 1
    if name == "terminate":
        status = call.kwargs.get("status", call.args[0] if call.args else "success")
        answer = str(call.kwargs.get("answer", ""))
        if status == "success":
            return ParsedAction("done", args={"answer": answer}, code=call.source), 1
        return ParsedAction("fail", args={"reason": answer}, code=call.source), 1
    if name in ("call_user", "ask_user", "CALL_USER"):
        question = call.kwargs.get("question", call.kwargs.get("text", call.args[0] if call.args else ""))
        if not isinstance(question, str) or not question.strip():
            raise ParseError(f"{name} needs the question to ask, e.g. call_user('Which account?')")
        return ParsedAction("ask_user", args={"question": question.strip()}, code=call.source), 1
    raise ParseError(f"{name}() is not an available action")


def parse_action(text: str) -> ParsedAction:
    """The first action of a model reply. Raises ``ParseError``."""
    code = extract_code(text)
    if not code:
        raise ParseError("no action found (expected a ```python block or a Toolcall: line with one pyautogui call, "
                         "WAIT, DONE or FAIL)")
    calls = _calls(code)
    answer = None
    kept: list[_Call] = []
    for call in calls:
        if call.name == "answer":  # answer('...') only carries DONE's answer
            answer = str(call.kwargs.get("text", call.args[0] if call.args else ""))
        else:
            kept.append(call)
    if not kept:
        if answer is not None:
            kept = [_Call("DONE", [], {}, "DONE")]
        else:
            raise ParseError("no action found in the code")
    action, used = _action(kept, 0)
    if action.kind == "done" and answer is not None and not action.args.get("answer"):
        action.args["answer"] = answer
    action.dropped = len(kept) - used
    visible = _THINK.sub("", text)
    match = _THOUGHT.search(visible) or _PLAIN_THOUGHT.search(visible)
    action.thought = match.group(1).strip() if match else ""
    if action.kind == "fail" and not action.args.get("reason"):
        action.args["reason"] = action.thought
    return action


def parse_json_action(text: str) -> ParsedAction:
    """A reply in JSON mode (``convention.action_json_schema``). Guided decoding makes it valid; a reply cut
    by max_tokens is still a ``ParseError``."""
    import json

    try:
        body = json.loads(text)
        action = body["action"]
        kind = action["kind"]
    except (ValueError, KeyError, TypeError):
        raise ParseError("the reply is not the JSON object {\"thought\": ..., \"action\": {\"kind\": ...}}") from None
    thought = str(body.get("thought", "")) if isinstance(body, dict) else ""

    def pt(x: str, y: str) -> tuple[float, float]:
        return _number(action.get(x), x), _number(action.get(y), y)

    if kind in ("click", "double_click", "right_click", "move"):
        return ParsedAction(kind, [pt("x", "y")], code=text, thought=thought)
    if kind == "drag":
        return ParsedAction(kind, [pt("x", "y"), pt("to_x", "to_y")], code=text, thought=thought)
    if kind == "scroll":
        clicks = action.get("clicks")
        if not isinstance(clicks, int) or isinstance(clicks, bool) or clicks == 0 or abs(clicks) > 50:
            raise ParseError("scroll clicks must be a non-zero whole number")
        return ParsedAction(kind, [pt("x", "y")], {"clicks": clicks, "horizontal": False}, code=text, thought=thought)
    if kind == "type":
        if not isinstance(action.get("text"), str) or not action["text"]:
            raise ParseError("type needs a non-empty text")
        return ParsedAction(kind, args={"text": action["text"]}, code=text, thought=thought)
    if kind == "key":
        keys = action.get("keys")
        return ParsedAction(kind, args={"keys": _keys(keys if isinstance(keys, list) else [keys])}, code=text,
                            thought=thought)
    if kind == "wait":
        return ParsedAction(kind, args={"seconds": DEFAULT_WAIT_S}, code=text, thought=thought)
    if kind == "done":
        return ParsedAction(kind, args={"answer": str(action.get("answer", ""))}, code=text, thought=thought)
    if kind == "fail":
        return ParsedAction(kind, args={"reason": str(action.get("reason", "")) or thought}, code=text,
                            thought=thought)
    raise ParseError(f"unknown action kind {kind!r}")


def parse_point(text: str) -> tuple[float, float] | None:
    """The point of a grounding answer: the first pointer action, else a bare ``(x=.., y=..)`` / ``(x, y)``."""
    try:
        action = parse_action(text)
        if action.points:
            return action.points[0]
    except ParseError:
        pass
    match = re.search(r"\(\s*(?:x\s*=\s*)?(-?\d+(?:\.\d+)?)\s*,\s*(?:y\s*=\s*)?(-?\d+(?:\.\d+)?)\s*\)", text)
    return (float(match.group(1)), float(match.group(2))) if match else None


def point_to_screen(point: tuple[float, float], *, image_size: tuple[int, int], screen_size: tuple[int, int],
                    coordinates: CoordinateMode = "auto") -> tuple[int, int]:
    """Model coordinates -> screen pixels. Fractions scale by the screen size; pixels are pixels of the
    screenshot the model saw (``image_size``) and scale by screen/image. Raises ``ActionRejected`` off screen."""
    (x, y), (iw, ih), (sw, sh) = point, image_size, screen_size
    mode = coordinates
    if mode == "auto":
        # pixels are whole numbers; 1.5 from a fraction-speaking model is an error, not a pixel
        in_unit = 0.0 <= x <= 1.0 and 0.0 <= y <= 1.0
        mode = "pixels" if not in_unit and float(x).is_integer() and float(y).is_integer() else "fraction"
    if mode == "fraction":
        if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
            raise ActionRejected(f"point ({x:g}, {y:g}) is off screen: fractions must lie in [0, 1]")
        px, py = min(int(x * sw), sw - 1), min(int(y * sh), sh - 1)
    else:
        if not (0.0 <= x < iw and 0.0 <= y < ih):
            raise ActionRejected(f"point ({x:g}, {y:g}) is off the {iw}x{ih} screenshot")
        px, py = min(int(x * sw / iw), sw - 1), min(int(y * sh / ih), sh - 1)
    return px, py


def to_screen(action: ParsedAction, *, image_size: tuple[int, int], screen_size: tuple[int, int],
              coordinates: CoordinateMode = "auto"):
    """The pixel ``ScreenAction`` for a parsed action. Raises ``ActionRejected`` (off screen) or ``ParseError``
    (arguments the action model refuses, e.g. over-long text)."""
    from pydantic import ValidationError

    pts = [point_to_screen(p, image_size=image_size, screen_size=screen_size, coordinates=coordinates)
           for p in action.points]
    builders = {
        "click": lambda: Click(x=pts[0][0], y=pts[0][1]),
        "double_click": lambda: DoubleClick(x=pts[0][0], y=pts[0][1]),
        "right_click": lambda: RightClick(x=pts[0][0], y=pts[0][1]),
        "move": lambda: Move(x=pts[0][0], y=pts[0][1]),
        "drag": lambda: Drag(x=pts[0][0], y=pts[0][1], to_x=pts[1][0], to_y=pts[1][1]),
        "scroll": lambda: Scroll(x=pts[0][0], y=pts[0][1], **action.args),
        "type": lambda: TypeText(**action.args),
        "key": lambda: Key(**action.args),
        "wait": lambda: Wait(**action.args),
        "done": lambda: Done(answer=action.args.get("answer", "")[:20_000]),
        "fail": lambda: Fail(reason=action.args.get("reason", "")[:20_000]),
        "ask_user": lambda: AskUser(**action.args),
    }
    try:
        return builders[action.kind]()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ParseError(f"{action.kind}: {'.'.join(map(str, first['loc']))} {first['msg']}") from None
