"""The video task's input, checked at submission."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agents.sources import FileInput, one_source

Kind = Literal["summarize", "question", "moments", "events"]


class VideoInput(BaseModel):
    """``kind``: ``summarize`` (what happens, with mm:ss citations), ``question`` (answer ``question`` with
    timestamp citations), ``moments`` (when does ``question`` happen: time ranges), ``events`` (every event,
    each shaped by ``schema``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    file: FileInput | None = None
    url: str | None = Field(None, max_length=4000, pattern=r"^https?://")
    blob: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    kind: Kind = "summarize"
    question: str | None = Field(None, min_length=1, max_length=4000)
    json_schema: dict[str, Any] | None = Field(None, alias="schema", description="events: the JSON schema of one "
                                                "event (an object); start/end times are added by us")
    max_frames: int = Field(64, ge=1, le=2048, description="frames sampled from the whole video")
    strategy: Literal["uniform", "scenes", "hybrid"] = "hybrid"
    max_side: int = Field(896, ge=64, le=4096, description="frames are resized so the longer side is at most this")
    overlap_frames: int = Field(1, ge=0, le=16, description="frames repeated between consecutive windows")
    frames_per_window: int | None = Field(None, ge=1, le=2048, description="cap on frames per model call "
                                          "(default: as many as the context window holds)")
    max_output_tokens: int = Field(512, ge=16, le=32768)
    max_observations: int = Field(12, ge=1, le=200, description="per window")
    max_text_chars: int = Field(300, ge=10, le=4000, description="per observation / answer sentence")
    max_seconds: float = Field(3 * 3600.0, gt=0, le=24 * 3600.0, description="longer videos are refused")
    dense_frames: int = Field(32, ge=0, le=2048, description="question/moments: frames of the second look, "
                              "sampled densely where the coarse pass found the question's answer (0: no second look)")
    max_segments: int = Field(4, ge=1, le=32, description="second look: at most this many segments per pass")
    max_passes: int = Field(3, ge=1, le=5, description="question/moments: the coarse pass plus up to this many "
                            "minus one looks, each narrower (around the edges found), until frames are 1 s apart")
    max_total_tokens: int | None = Field(None, ge=1000, description="prompt + completion tokens of all model calls "
                                         "of the task; the second look gets what the coarse pass left")

    @model_validator(mode="after")
    def _consistent(self) -> "VideoInput":
        one_source(self.file, self.url, self.blob)
        if self.kind in ("question", "moments") and not self.question:
            raise ValueError(f"kind={self.kind!r} needs a question")
        if self.kind != "events" and self.json_schema is not None:
            raise ValueError("schema is only used with kind='events'")
        return self

    @field_validator("json_schema")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and (value.get("type", "object") != "object" or not isinstance(
                value.get("properties"), dict) or not value["properties"]):
            raise ValueError('schema must be a JSON schema object with "properties" (one event)')
        return value
