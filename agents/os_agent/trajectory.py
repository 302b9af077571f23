"""One OS-agent step as it is stored in the task's session and streamed as a ``step_result`` event."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

StepStatus = Literal[
    "executed",   # the action ran on the desktop
    "terminal",   # done / fail: nothing to execute, the loop ends
    "malformed",  # the model's output did not parse (after the corrective re-prompt): nothing executed
    "off_screen",  # the point(s) fell outside the screen: nothing executed
    "blocked",    # the safety policy (or a declined confirmation) refused it: nothing executed
    "rejected",   # the executor refused it (unknown key...): nothing executed
    "error",      # the executor failed while acting or observing (crash, unreachable)
    "asked",      # ask_user: the question went to a person; ``user_reply`` is the answer (None: none yet)
]


class StepRecord(BaseModel):
    index: int
    screenshot: str | None = Field(None, description="blob ref (sha256 hex) of the PNG the model saw")
    screen_width: int = 0
    screen_height: int = 0
    window_title: str | None = None
    model_output: str = ""
    action: dict[str, Any] | None = Field(None, description="the pixel action (connectors.desktop.actions), "
                                          "None when nothing parsed")
    status: StepStatus
    detail: str = ""
    user_reply: str | None = Field(None, description="ask_user: the person's answer (POST /v1/tasks/{id}/reply)")
    timings: dict[str, float] = Field(default_factory=dict, description="seconds: screenshot, encode, model, "
                                      "execute")
