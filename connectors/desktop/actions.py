"""Desktop actions in screen pixels: what an executor is asked to do.

The model speaks in its own convention (Kimi-VL: fractions of the screenshot, see ``agents.os_agent.convention``);
the agent converts to these pixel actions and checks them before any executor sees them. Executors check the
bounds again (a remote desktop host must not trust its caller).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_TYPE_CHARS = 2000
MAX_WAIT_S = 60.0


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _PointAction(_Action):
    x: int = Field(..., ge=0)
    y: int = Field(..., ge=0)

    def points(self) -> list[tuple[int, int]]:
        return [(self.x, self.y)]


class Click(_PointAction):
    kind: Literal["click"] = "click"


class DoubleClick(_PointAction):
    kind: Literal["double_click"] = "double_click"


class RightClick(_PointAction):
    kind: Literal["right_click"] = "right_click"


class Move(_PointAction):
    kind: Literal["move"] = "move"


class Drag(_Action):
    kind: Literal["drag"] = "drag"
    x: int = Field(..., ge=0)
    y: int = Field(..., ge=0)
    to_x: int = Field(..., ge=0)
    to_y: int = Field(..., ge=0)

    def points(self) -> list[tuple[int, int]]:
        return [(self.x, self.y), (self.to_x, self.to_y)]


class Scroll(_PointAction):
    """``clicks`` > 0 scrolls up (content moves down), < 0 scrolls down, as pyautogui.scroll; ``horizontal``
    scrolls right for > 0."""

    kind: Literal["scroll"] = "scroll"
    clicks: int = Field(..., ge=-50, le=50)
    horizontal: bool = False


class TypeText(_Action):
    kind: Literal["type"] = "type"
    text: str = Field(..., min_length=1, max_length=MAX_TYPE_CHARS)
    # the text as anything that records actions may keep it (secret placeholders instead of the values the agent
    # filled in for the executor); never serialised
    recordable_text: str | None = Field(None, exclude=True)

    def recordable(self) -> "TypeText":
        """This action as a recorder may store it: the placeholders, never a filled-in secret."""
        if self.recordable_text is None:
            return self
        return TypeText.model_construct(text=self.recordable_text)

    def points(self) -> list[tuple[int, int]]:
        return []


class Key(_Action):
    """One key or a chord pressed together (``["ctrl", "s"]``), in pyautogui key names (lower case)."""

    kind: Literal["key"] = "key"
    keys: list[str] = Field(..., min_length=1, max_length=6)

    def points(self) -> list[tuple[int, int]]:
        return []


class Wait(_Action):
    kind: Literal["wait"] = "wait"
    seconds: float = Field(1.0, ge=0.0, le=MAX_WAIT_S)

    def points(self) -> list[tuple[int, int]]:
        return []


class Done(_Action):
    """The goal is met; ``answer`` is the task's answer (may be empty)."""

    kind: Literal["done"] = "done"
    answer: str = Field("", max_length=20_000)

    def points(self) -> list[tuple[int, int]]:
        return []


class Fail(_Action):
    """The model gives up: the goal can't be met from here."""

    kind: Literal["fail"] = "fail"
    reason: str = Field("", max_length=20_000)

    def points(self) -> list[tuple[int, int]]:
        return []


class AskUser(_Action):
    """The model hands control to a person: nothing runs on the desktop; the agent asks ``question`` and waits
    for the answer (``POST /v1/tasks/{id}/reply``), which the next step's prompt carries."""

    kind: Literal["ask_user"] = "ask_user"
    question: str = Field(..., min_length=1, max_length=2000)

    def points(self) -> list[tuple[int, int]]:
        return []


ScreenAction = Annotated[
    Union[Click, DoubleClick, RightClick, Move, Drag, Scroll, TypeText, Key, Wait, Done, Fail, AskUser],
    Field(discriminator="kind"),
]
TERMINAL_KINDS = frozenset({"done", "fail"})
NON_DESKTOP_KINDS = frozenset({"done", "fail", "ask_user"})  # handled by the agent, never sent to an executor
POINTER_KINDS = frozenset({"click", "double_click", "right_click", "move", "drag", "scroll"})


def describe(action: _Action) -> str:
    """A short human-readable line (history summaries, reports, logs)."""
    kind = getattr(action, "kind")
    if isinstance(action, Drag):
        return f"drag ({action.x},{action.y}) -> ({action.to_x},{action.to_y})"
    if isinstance(action, Scroll):
        return f"scroll {action.clicks:+d}{' horizontal' if action.horizontal else ''} at ({action.x},{action.y})"
    if isinstance(action, _PointAction):
        return f"{kind} ({action.x},{action.y})"
    if isinstance(action, TypeText):
        text = action.text if len(action.text) <= 60 else action.text[:57] + "..."
        return f"type {text!r}"
    if isinstance(action, Key):
        return "key " + "+".join(action.keys)
    if isinstance(action, Wait):
        return f"wait {action.seconds:g}s"
    if isinstance(action, Done):
        return f"done {action.answer[:80]!r}" if action.answer else "done"
    if isinstance(action, Fail):
        return f"fail {action.reason[:80]!r}"
    if isinstance(action, AskUser):
        return f"ask the user {action.question[:80]!r}"
    return kind
