"""Desktops the OS agent acts on: pixel actions, the executor interface and its implementations.

Heavy or optional pieces (FastAPI host, Pillow grabs) import lazily inside the modules that need them.
"""

from connectors.desktop.actions import (
    Click, DoubleClick, Done, Drag, Fail, Key, Move, RightClick, ScreenAction, Scroll, TypeText, Wait, describe,
)
from connectors.desktop.base import (
    ActionOutcome, ActionRejected, Executor, ExecutorError, Observation, Screenshot, check_on_screen,
)
from connectors.desktop.registry import (
    DesktopSpec, HttpDesktopSpec, ReplayDesktopSpec, X11DesktopSpec, desktops_from_env, open_executor,
)
from connectors.desktop.replay import RecordedStep, RecordedTrajectory, ReplayExecutor, TrajectoryRecorder
from connectors.desktop.x11 import X11Executor
from connectors.desktop.xvfb import VirtualDisplay, XvfbError

__all__ = [
    "ActionOutcome", "ActionRejected", "Click", "DesktopSpec", "DoubleClick", "Done", "Drag", "Executor",
    "ExecutorError", "Fail", "HttpDesktopSpec", "Key", "Move", "Observation", "RecordedStep", "RecordedTrajectory",
    "ReplayDesktopSpec", "ReplayExecutor", "RightClick", "ScreenAction", "Screenshot", "Scroll",
    "TrajectoryRecorder", "TypeText", "VirtualDisplay", "Wait", "X11DesktopSpec", "X11Executor", "XvfbError",
    "check_on_screen", "describe", "desktops_from_env", "open_executor",
]
