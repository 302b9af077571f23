"""A terminal progress display driven by task events, with no dependencies.

On a TTY, ``progress`` events redraw one line in place (``\\r[#####.....] 3/6 chunk 3 done``) and other
events print above it; elsewhere (pipes, CI logs) every event is one plain line, so logs stay readable.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from kimiray.types import Progress, TaskEvent


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def render_bar(progress: Progress, width: int = 10) -> str:
    """``[#####.....] 3/6 message``; without a known total, ``3 message`` (no bar to fill)."""
    fraction = progress.fraction
    if fraction is None:
        head = _num(progress.done) if progress.done is not None else "..."
    else:
        filled = round(fraction * width)
        head = f"[{'#' * filled}{'.' * (width - filled)}] {_num(progress.done)}/{_num(progress.total)}"
    return f"{head} {progress.message}" if progress.message else head


def _compact(data: dict[str, Any], limit: int = 160) -> str:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_event(event: TaskEvent, width: int = 10) -> str:
    """One human line for any event (the bar for ``progress``)."""
    data = event.data
    if event.type == "progress":
        return render_bar(Progress.model_validate(data), width)
    if event.type == "status":
        line = f"status: {data.get('status', '?')}"
        if data.get("attempt") is not None:
            line += f" (attempt {data['attempt']})"
        error = data.get("error")
        if isinstance(error, dict):
            line += f" - {error.get('code') or 'error'}: {error.get('message', '')}"
        elif error:
            line += f" - {error}"
        if data.get("reason"):
            line += f" ({data['reason']})"
        return line
    if event.type == "cancel_requested":
        return "cancel requested"
    if event.type == "log":
        level = data.get("level")
        message = data.get("message", _compact(data))
        return f"log: {level}: {message}" if level else f"log: {message}"
    return f"{event.type}: {_compact(data)}" if data else event.type


class ProgressPrinter:
    """Feed it events (``handle``); call ``close`` at the end so a half-drawn bar line gets its newline."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, width: int = 20,
                 show_events: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.width = width
        self.show_events = show_events
        self._bar_len = 0  # characters of the bar line now on screen (TTY); 0 = cursor at a line start
        self._bar = ""

    def handle(self, event: TaskEvent) -> None:
        line = render_event(event, self.width)
        if not self.tty:
            if event.type == "progress" or self.show_events:
                self.stream.write(line + "\n")
        elif event.type == "progress":
            self._draw(line)
        elif self.show_events:
            bar = self._bar  # print the event over the bar, then draw the bar again below it
            self._draw(line)
            self.stream.write("\n")
            self._bar_len = 0
            self._bar = ""
            if bar and not event.is_terminal:
                self._draw(bar)
        self.stream.flush()

    def _draw(self, line: str) -> None:
        pad = " " * max(0, self._bar_len - len(line))
        self.stream.write("\r" + line + pad)
        self._bar_len = len(line)
        self._bar = line

    def _end_bar(self) -> None:
        if self._bar_len:
            self.stream.write("\n")
            self._bar_len = 0
            self._bar = ""

    def close(self) -> None:
        self._end_bar()
        self.stream.flush()

    def __enter__(self) -> ProgressPrinter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
