"""The executor interface the OS agent talks to: observe the screen, execute one pixel action.

Implementations: ``x11.X11Executor`` (a real X display: Xvfb in tests, xdotool for input), ``replay.ReplayExecutor``
(recorded trajectories), ``http.HttpExecutor`` (a remote desktop host running ``http.desktop_host_app``). The
agent never knows which one it has.
"""

from __future__ import annotations

import io
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from connectors.desktop.actions import ScreenAction


class ExecutorError(RuntimeError):
    """The desktop can't be reached or the executor crashed (a step failure, never a stuck task)."""


class ActionRejected(ValueError):
    """The executor refuses the action (off screen, unknown key, terminal action): nothing was executed."""


class Screenshot(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    png: bytes = Field(..., repr=False)
    width: int
    height: int

    def image(self):  # -> PIL.Image.Image
        from PIL import Image

        return Image.open(io.BytesIO(self.png)).convert("RGB")


class Observation(BaseModel):
    screenshot: Screenshot
    window_title: str | None = None
    accessibility_text: str | None = None
    taken_s: float = 0.0  # seconds the observation took


class ActionOutcome(BaseModel):
    ok: bool = True
    detail: str = ""
    duration_s: float = 0.0


@runtime_checkable
class Executor(Protocol):
    async def observe(self) -> Observation:
        """A fresh screenshot (+ window title / accessibility text where the executor has them)."""
        ...

    async def screen_size(self) -> tuple[int, int]: ...

    async def execute(self, action: ScreenAction) -> ActionOutcome:
        """Perform one non-terminal action. Raises ``ActionRejected`` (nothing done) or ``ExecutorError``."""
        ...

    async def close(self) -> None: ...


def check_on_screen(action: ScreenAction, width: int, height: int) -> None:
    """Raise ``ActionRejected`` unless every point of ``action`` lies on a ``width`` x ``height`` screen."""
    for x, y in action.points():
        if not (0 <= x < width and 0 <= y < height):
            raise ActionRejected(f"{action.kind} at ({x},{y}) is off the {width}x{height} screen")
