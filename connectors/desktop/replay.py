"""Recorded trajectories: record a real run once, replay it without a desktop.

Why: agent-loop tests and regressions need the screens a real desktop produced, deterministically and without
Xvfb. ``TrajectoryRecorder`` wraps any executor and writes what it saw and did; ``ReplayExecutor`` serves those
screens back and checks the agent takes the recorded actions.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_serializer, field_validator

from connectors.desktop.actions import TERMINAL_KINDS, ScreenAction, TypeText, describe
from connectors.desktop.base import ActionOutcome, ActionRejected, Executor, ExecutorError, Observation, \
    Screenshot, check_on_screen

_POINT_FIELDS = frozenset({"x", "y", "to_x", "to_y"})


class RecordedStep(BaseModel):
    """One observation and the action taken on it (``None``: nothing was taken, e.g. the final screen)."""

    png: bytes = Field(..., repr=False, description="the screenshot PNG; base64 in JSON")
    width: int = Field(..., gt=0)
    height: int = Field(..., gt=0)
    window_title: str | None = None
    accessibility_text: str | None = None
    action: ScreenAction | None = None

    @field_validator("png", mode="before")
    @classmethod
    def _decode_png(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except ValueError as exc:
                raise ValueError(f"png is not valid base64: {exc}") from None
        return value

    @field_serializer("png", when_used="json")
    def _encode_png(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    def observation(self) -> Observation:
        return Observation(screenshot=Screenshot(png=self.png, width=self.width, height=self.height),
                           window_title=self.window_title, accessibility_text=self.accessibility_text)


class RecordedTrajectory(BaseModel):
    version: int = 1
    steps: list[RecordedStep] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "RecordedTrajectory":
        return cls.model_validate_json(Path(path).read_text())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RecordedTrajectory":
        return cls.model_validate(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json())


class ReplayMismatch(BaseModel):
    step: int
    expected: dict[str, Any] | None
    got: dict[str, Any]
    difference: str


def action_difference(expected: ScreenAction | None, got: ScreenAction, tolerance_px: int = 0) -> str | None:
    """A short description of how ``got`` differs from ``expected``; None when they match (points within
    ``tolerance_px``, every other field exactly)."""
    if expected is None:
        return f"no action was recorded here, got {describe(got)}"
    if expected.kind != got.kind:
        return f"kind: expected {expected.kind}, got {got.kind}"
    want, have = expected.model_dump(), got.model_dump()
    for name in want:
        a, b = want[name], have.get(name)
        same = abs(a - b) <= tolerance_px if name in _POINT_FIELDS else a == b
        if not same:
            return f"{name}: expected {a!r}, got {b!r}"
    return None


class ReplayExecutor:
    """Serves a ``RecordedTrajectory`` step by step. ``strict``: a differing action is rejected (nothing advances);
    otherwise it is noted in ``mismatches`` and the replay moves on."""

    def __init__(self, trajectory: RecordedTrajectory | dict[str, Any] | str | Path, *, strict: bool = False,
                 tolerance_px: int = 0) -> None:
        if isinstance(trajectory, (str, Path)):
            trajectory = RecordedTrajectory.load(trajectory)
        elif isinstance(trajectory, dict):
            trajectory = RecordedTrajectory.from_dict(trajectory)
        if not trajectory.steps:
            raise ValueError("the trajectory has no steps")
        self.trajectory = trajectory
        self.strict, self.tolerance_px = strict, tolerance_px
        self.index = 0
        self.executed: list[ScreenAction] = []
        self.mismatches: list[ReplayMismatch] = []

    def _step(self) -> RecordedStep:
        if self.index >= len(self.trajectory.steps):
            raise ExecutorError(f"trajectory exhausted after {len(self.trajectory.steps)} steps")
        return self.trajectory.steps[self.index]

    async def observe(self) -> Observation:
        return self._step().observation()

    async def screen_size(self) -> tuple[int, int]:
        steps = self.trajectory.steps
        step = steps[min(self.index, len(steps) - 1)]
        return step.width, step.height

    async def execute(self, action: ScreenAction) -> ActionOutcome:
        if action.kind in TERMINAL_KINDS:
            raise ActionRejected(f"{action.kind} is terminal: nothing to execute")
        step = self._step()
        if step.action is None:
            raise ExecutorError(f"trajectory exhausted: no action was recorded at step {self.index}")
        check_on_screen(action, step.width, step.height)
        difference = action_difference(step.action, action, self.tolerance_px)
        if difference is not None:
            if self.strict:
                raise ActionRejected(f"step {self.index} differs from the recording: {difference}")
            self.mismatches.append(ReplayMismatch(step=self.index, expected=step.action.model_dump(),
                                                  got=action.model_dump(), difference=difference))
        self.executed.append(action)
        self.index += 1
        return ActionOutcome(ok=True, detail=f"replayed {describe(action)}")

    async def close(self) -> None:
        """Nothing to release."""


class TrajectoryRecorder:
    """Wraps any executor; every observation becomes a step and every executed action is attached to the
    step it was taken on. ``save(path)`` writes JSON ``ReplayExecutor`` can load."""

    def __init__(self, inner: Executor, *, meta: dict[str, Any] | None = None) -> None:
        self.inner = inner
        self.trajectory = RecordedTrajectory(meta={"recorded_at": time.time(), **(meta or {})})

    def _pending(self) -> RecordedStep | None:
        steps = self.trajectory.steps
        return steps[-1] if steps and steps[-1].action is None else None

    async def observe(self) -> Observation:
        obs = await self.inner.observe()
        step = RecordedStep(png=obs.screenshot.png, width=obs.screenshot.width, height=obs.screenshot.height,
                            window_title=obs.window_title, accessibility_text=obs.accessibility_text)
        pending = self._pending()
        if pending is not None:  # observed twice without acting: keep only the latest screen
            self.trajectory.steps[-1] = step
        else:
            self.trajectory.steps.append(step)
        return obs

    async def screen_size(self) -> tuple[int, int]:
        return await self.inner.screen_size()

    async def execute(self, action: ScreenAction) -> ActionOutcome:
        if self._pending() is None and action.kind not in TERMINAL_KINDS:
            await self.observe()  # acted without looking: record the screen it acted on
        outcome = await self.inner.execute(action)  # rejected / failed actions are not recorded
        pending = self._pending()
        if pending is not None:  # typed secrets are recorded as their placeholders
            pending.action = action.recordable() if isinstance(action, TypeText) else action
        return outcome

    async def close(self) -> None:
        await self.inner.close()

    def save(self, path: str | Path) -> None:
        self.trajectory.save(path)
