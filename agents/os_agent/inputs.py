"""The ``os_agent`` task's input, checked at submission (bad input is a 422, never a failed task later)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.os_agent.parse import CoordinateMode
from agents.os_agent.policy import SafetyPolicy


class OSAgentInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    goal: str = Field(..., min_length=1, max_length=4000, description="what to achieve on the desktop")
    desktop: str | None = Field(None, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$", description=(
        "a desktop the operator configured on the runners (KIMIRAY_DESKTOPS, or the runner's DISPLAY as "
        "'local'); None: the only one configured"))
    replay: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description=(
        "instead of a live desktop: a recorded trajectory (JSON uploaded with POST /v1/files) to replay"))
    max_steps: int = Field(15, ge=1, le=200)
    max_seconds: float = Field(600.0, gt=0, le=4 * 3600, description="time budget of the whole run")
    step_timeout_s: float = Field(180.0, gt=0, le=3600, description="budget of one step (observe, model, act)")
    max_consecutive_failures: int = Field(3, ge=1, le=50, description="failed steps in a row that end the run")
    policy: SafetyPolicy = Field(default_factory=SafetyPolicy)
    coordinates: CoordinateMode = Field("auto", description="how to read the model's x/y: fractions of the "
                                        "screenshot (Kimi-VL), pixels of the screenshot, or auto (<= 1: fraction)")
    action_format: Literal["pyautogui", "json"] = Field("pyautogui", description=(
        "pyautogui: Kimi-VL's trained output form (default); json: replies forced into a JSON action schema by "
        "guided decoding, so every step parses"))
    keep_screenshots: int = Field(2, ge=1, le=8, description="screenshots in each prompt (the current one and "
                                  "the latest earlier ones; older steps are summarised in text)")
    screenshot_max_side: int = Field(1920, ge=224, le=4096, description="screenshots are downscaled to this "
                                     "long side before the model sees them")
    max_output_tokens: int = Field(512, ge=16, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    instructions: str = Field("", max_length=8000, description="extra system instructions")
    settle_s: float = Field(0.3, ge=0.0, le=10.0, description="pause after an action before the next screenshot")
    confirm_timeout_s: float = Field(300.0, gt=0, le=24 * 3600, description="how long a risky action waits for "
                                     "POST /v1/tasks/{id}/confirm before it is declined")

    reply_timeout_s: float = Field(600.0, gt=0, le=24 * 3600, description="how long a call_user question waits "
                                   "for POST /v1/tasks/{id}/reply before the run ends with outcome no_reply")

    recording: bool = Field(True, description="also write an MP4 of the episode (each step's screenshot with its "
                            "action drawn), artifact 'recording'")
    recording_fps: int = Field(2, ge=1, le=10, description="frames per second of the recording (2 frames a step)")

    @model_validator(mode="after")
    def _one_desktop(self) -> "OSAgentInput":
        if self.desktop is not None and self.replay is not None:
            raise ValueError("give desktop or replay, not both")
        return self
