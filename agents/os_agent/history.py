"""The prompt of one OS-agent step, kept inside the model's window.

Layout (Kimi-VL chat format): system (action space + reply format), then a user turn with the goal and a text
summary of every earlier step, then the last few steps as user(screenshot) / assistant(reply) turns, then the
current screenshot. When that does not fit ``window - max_tokens``, we shed in this order: older screenshots are
downscaled (half size, twice), then dropped (their step stays in the summary), then the summary loses its middle
lines, then the accessibility text (when the executor has one) is halved, and last the current screenshot is
downscaled. Exact token counts come from the served model's tokenizer
and processor (``pipelines.context.TokenCounter``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from agents.os_agent import convention
from agents.os_agent.trajectory import StepRecord
from connectors.desktop.actions import describe

MIN_SIDE = 112
MAX_ACCESSIBILITY_CHARS = 20_000  # below this a screenshot says nothing; we stop downscaling


class PromptTooLarge(ValueError):
    """Even the goal and one small screenshot exceed the window: the task can't run with this model."""


@dataclass
class PastStep:
    record: StepRecord
    image: Image.Image | None  # the screenshot the model saw at that step (None once dropped)


def step_line(record: StepRecord) -> str:
    from pydantic import TypeAdapter

    from connectors.desktop.actions import ScreenAction

    what = "no action"
    if record.action:
        what = describe(TypeAdapter(ScreenAction).validate_python(record.action))
    outcome = {"executed": "done", "terminal": "ended the task"}.get(record.status, f"{record.status}")
    detail = f" ({record.detail})" if record.detail and record.status not in ("executed", "asked") else ""
    if record.status == "asked":
        outcome = f"the user answered {record.user_reply!r}" if record.user_reply is not None else "no answer"
    title = f" in {record.window_title!r}" if record.window_title else ""
    return f"Step {record.index + 1}: {what}{title} -> {outcome}{detail}"


def _scaled(image: Image.Image, factor: float) -> Image.Image:
    w, h = image.size
    if min(w, h) * factor < MIN_SIDE:
        factor = MIN_SIDE / min(w, h)
    if factor >= 1.0:
        return image
    return image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.BILINEAR)


def fit_image(image: Image.Image, max_side: int) -> Image.Image:
    """The screenshot as the model gets it: at most ``max_side`` on its long side (fractions are unaffected)."""
    return _scaled(image, max_side / max(image.size)) if max(image.size) > max_side else image


class StepPrompt:
    """Builds the messages for step ``index`` and shrinks them until they fit."""

    def __init__(self, *, counter: Any, window: int, max_tokens: int, goal: str, instructions: str = "",
                 keep_screenshots: int = 2, json_actions: bool = False) -> None:
        self.counter = counter
        self.limit = window - max_tokens
        self.goal = goal
        self.system = (convention.json_system_prompt if json_actions else convention.system_prompt)(instructions)
        self.keep = max(1, keep_screenshots)

    def _messages(self, summary: list[str], recent: list[PastStep], current: Image.Image, title: str | None,
                  index: int, note: str, accessibility: str) -> list[dict[str, Any]]:
        intro = f"Task: {self.goal}"
        if summary:
            intro += "\n\nEarlier steps (oldest first):\n" + "\n".join(summary)
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.system},
                                          {"role": "user", "content": intro}]
        for past in recent:
            parts: list[dict[str, Any]] = [{"type": "text", "text": f"Screenshot before step {past.record.index + 1}:"}]
            if past.image is not None:
                parts.append({"type": "image", "image": past.image})
            messages.append({"role": "user", "content": parts})
            messages.append({"role": "assistant", "content": past.record.model_output or "(no reply)"})
            messages.append({"role": "user", "content": step_line(past.record)})
        where = f" The active window is {title!r}." if title else ""
        text = f"{note}\nCurrent screenshot (step {index + 1}).{where}".strip()
        if accessibility:
            text += f"\nAccessibility tree of the screen:\n{accessibility}"
        text += " What is the next action?" if not accessibility else "\nWhat is the next action?"
        messages.append({"role": "user", "content": [{"type": "image", "image": current},
                                                     {"type": "text", "text": text}]})
        return _merge_user_turns(messages)

    def build(self, past: list[PastStep], current: Image.Image, *, title: str | None, index: int,
              note: str = "", accessibility: str | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The messages and what was shed (``{"tokens", "screenshots", "summarised", "dropped_lines"}``)."""
        recent = [PastStep(p.record, p.image) for p in past[-(self.keep - 1):]] if self.keep > 1 else []
        older = past[: len(past) - len(recent)]
        summary = [step_line(p.record) for p in older]
        dropped_lines = 0  # summary lines omitted after the first two
        accessibility = (accessibility or "")[:MAX_ACCESSIBILITY_CHARS]
        for stage in range(64):
            shown = summary if not dropped_lines else [
                *summary[:2], f"... ({dropped_lines} earlier steps omitted) ...", *summary[2 + dropped_lines:]]
            messages = self._messages(shown, recent, current, title, index, note, accessibility)
            tokens = self.counter.count_messages(messages)
            if tokens <= self.limit:
                info = {"tokens": tokens, "screenshots": 1 + sum(p.image is not None for p in recent),
                        "summarised": len(summary) - dropped_lines, "dropped_lines": dropped_lines}
                return messages, info
            shrinkable = [p for p in recent if p.image is not None and min(p.image.size) > MIN_SIDE * 2]
            if shrinkable and stage < 4:
                shrinkable[0].image = _scaled(shrinkable[0].image, 0.5)
            elif any(p.image is not None for p in recent):
                oldest = next(p for p in recent if p.image is not None)
                summary.append(step_line(oldest.record))
                recent.remove(oldest)
            elif len(summary) - 2 - dropped_lines > 2:
                dropped_lines += max(1, (len(summary) - 2 - dropped_lines) // 2)
            elif len(accessibility) > 200:  # the accessibility text gives way before the current screenshot
                accessibility = accessibility[: len(accessibility) // 2] + "\n..."
            elif min(current.size) > MIN_SIDE:
                current = _scaled(current, 0.75)
            else:
                raise PromptTooLarge(f"the goal and one {current.size[0]}x{current.size[1]} screenshot need "
                                     f"{tokens} tokens, over the {self.limit} this model allows")
        raise PromptTooLarge("could not fit the step into the context window")


def _merge_user_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive user messages become one (the chat template expects alternating turns)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if out and out[-1]["role"] == "user" and message["role"] == "user":
            prev = out[-1]["content"]
            prev_parts = prev if isinstance(prev, list) else [{"type": "text", "text": prev}]
            new = message["content"]
            new_parts = new if isinstance(new, list) else [{"type": "text", "text": new}]
            out[-1] = {"role": "user", "content": [*prev_parts, {"type": "text", "text": "\n"}, *new_parts]}
        else:
            out.append(dict(message))
    return out
