"""What the OS agent may do on a desktop: an allow/deny policy checked before every action, and the
confirmation hook for actions the operator marked risky.

The policy runs on the *pixel* action and the current observation (window title), so it is independent of the
model's output format. Every refusal is a step failure with a reason the model sees next step; nothing refused
ever reaches the executor.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from connectors.desktop.actions import Key, TypeText

# Chords that leave the session, kill the X server or lock the screen. Compared as sorted sets of key names.
DEFAULT_BLOCKED_HOTKEYS = ["ctrl+alt+delete", "ctrl+alt+backspace", "ctrl+alt+del", "super+l", "ctrl+alt+l",
                           *[f"ctrl+alt+f{i}" for i in range(1, 13)]]
DEFAULT_BLOCKED_TEXT = [r"\brm\s+-[a-z]*r[a-z]*f", r"\bsudo\b", r"\bmkfs\b", r":\(\)\s*\{", r"\bshutdown\b",
                        r"\breboot\b", r"\bdd\s+if="]
DEFAULT_TERMINAL_TITLES = [r"terminal", r"xterm", r"konsole", r"\bbash\b", r"\bzsh\b", r"\bsh\b", r"shell",
                           r"\btty", r"cmd\.exe", r"powershell", r"command prompt", r"alacritty", r"kitty", r"tmux"]
_ALIASES = {"control": "ctrl", "del": "delete", "return": "enter", "escape": "esc", "win": "super", "cmd": "super",
            "command": "super", "meta": "super", "option": "alt"}


def chord(keys: list[str] | str) -> frozenset[str]:
    """A key chord as a set of canonical names: "Ctrl+Alt+Del" == ["alt", "ctrl", "delete"]."""
    parts = keys.split("+") if isinstance(keys, str) else keys
    return frozenset(_ALIASES.get(k.strip().lower(), k.strip().lower()) for k in parts if k.strip())


class Region(BaseModel):
    """A screen rectangle in pixels (inclusive-exclusive) that pointer actions must not touch."""

    model_config = ConfigDict(extra="forbid")
    x0: int = Field(..., ge=0)
    y0: int = Field(..., ge=0)
    x1: int = Field(..., ge=0)
    y1: int = Field(..., ge=0)
    name: str = Field("", max_length=200)

    def contains(self, x: int, y: int) -> bool:
        return self.x0 <= x < self.x1 and self.y0 <= y < self.y1


class SafetyPolicy(BaseModel):
    """Per task (``input.policy``); the defaults are safe for an unattended desktop."""

    model_config = ConfigDict(extra="forbid")

    allowed_actions: list[Literal["click", "double_click", "right_click", "move", "drag", "scroll", "type", "key",
                                  "wait"]] | None = Field(None, description="only these kinds (None: all)")
    blocked_hotkeys: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKED_HOTKEYS), max_length=200)
    blocked_text: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKED_TEXT), max_length=200,
                                    description="regexes (case-insensitive) that typed text must not match")
    allow_terminal_typing: bool = Field(False, description="type / keys into a window whose title looks like a "
                                        "terminal")
    terminal_titles: list[str] = Field(default_factory=lambda: list(DEFAULT_TERMINAL_TITLES), max_length=100)
    blocked_regions: list[Region] = Field(default_factory=list, max_length=100)
    confirm: list[str] = Field(default_factory=list, max_length=100, description=(
        "actions that need a confirmation before they run: kinds (\"type\", \"drag\"), hotkeys (\"key:ctrl+s\"), "
        "or \"text:<regex>\" for typed text"))
    on_confirm_timeout: Literal["deny"] = "deny"

    @field_validator("blocked_text", "terminal_titles")
    @classmethod
    def _regexes_compile(cls, values: list[str]) -> list[str]:
        for value in values:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad regex {value!r}: {exc}") from None
        return values

    @field_validator("confirm")
    @classmethod
    def _confirm_rules(cls, values: list[str]) -> list[str]:
        for value in values:
            if value.startswith("text:"):
                try:
                    re.compile(value[5:])
                except re.error as exc:
                    raise ValueError(f"bad regex in {value!r}: {exc}") from None
        return values


class Verdict(BaseModel):
    allowed: bool
    needs_confirmation: bool = False
    reason: str = ""


def _looks_like_terminal(title: str | None, patterns: list[str]) -> bool:
    return bool(title) and any(re.search(p, title, re.I) for p in patterns)


def check(policy: SafetyPolicy, action: Any, window_title: str | None) -> Verdict:
    """Is ``action`` (a pixel ScreenAction) allowed now? Terminal actions (done / fail) always are."""
    kind = action.kind
    if kind in ("done", "fail"):
        return Verdict(allowed=True)
    if policy.allowed_actions is not None and kind not in policy.allowed_actions:
        return Verdict(allowed=False, reason=f"{kind} is not allowed by the task's policy")
    for x, y in action.points():
        for region in policy.blocked_regions:
            if region.contains(x, y):
                return Verdict(allowed=False, reason=f"({x},{y}) lies in the blocked region "
                                                     f"{region.name or [region.x0, region.y0, region.x1, region.y1]}")
    if isinstance(action, Key):
        pressed = chord(action.keys)
        for blocked in policy.blocked_hotkeys:
            if pressed == chord(blocked):
                return Verdict(allowed=False, reason=f"the hotkey {'+'.join(action.keys)} is blocked")
    if isinstance(action, TypeText):
        for pattern in policy.blocked_text:
            if re.search(pattern, action.text, re.I):
                return Verdict(allowed=False, reason="the text to type matches a blocked pattern")
    if isinstance(action, TypeText | Key) and not policy.allow_terminal_typing and _looks_like_terminal(
            window_title, policy.terminal_titles):
        return Verdict(allowed=False, reason=f"typing into a terminal ({window_title!r}) is not allowed")
    for rule in policy.confirm:
        if rule == kind:
            return Verdict(allowed=True, needs_confirmation=True, reason=f"{kind} needs a confirmation")
        if rule.startswith("key:") and isinstance(action, Key) and chord(action.keys) == chord(rule[4:]):
            return Verdict(allowed=True, needs_confirmation=True, reason=f"the hotkey {rule[4:]} needs a confirmation")
        if rule.startswith("text:") and isinstance(action, TypeText) and re.search(rule[5:], action.text, re.I):
            return Verdict(allowed=True, needs_confirmation=True, reason="this text needs a confirmation")
    return Verdict(allowed=True)


class ConfirmationHook(Protocol):
    """Asked before a risky action runs; True lets it run. SDK users pass their own (a UI prompt, a Slack
    approval...); tasks use ``agents.os_agent.agent.TaskConfirmation`` (an event + ``POST /v1/tasks/{id}/confirm``)."""

    async def __call__(self, step: int, action: Any, reason: str) -> bool: ...
