"""Instructions and output schemas of the video agent's two kinds of calls: per-window observations and the
final answer over the timeline. Times are "mm:ss" (or "h:mm:ss") strings constrained by a pattern."""

from __future__ import annotations

from typing import Any

from agents.video.inputs import VideoInput

TS_PATTERN = r"^([0-9]{1,2}:)?[0-5]?[0-9]:[0-5][0-9]$"
_TS = {"type": "string", "pattern": TS_PATTERN}

TASKS = {
    "summarize": "Describe what happens in these frames: each distinct scene, action or on-screen text.",
    "question": "Note everything in these frames that helps answer the question: {question}",
    "moments": "Find the moments that match: {question}. Mark an observation relevant only if it matches.",
    "events": "List every event visible in these frames, each with the fields of its schema.",
}


def window_prompt(input: VideoInput) -> str:
    task = TASKS[input.kind].format(question=input.question or "")
    return (
        "You watch frames sampled from a video. Each frame is preceded by its timestamp in [mm:ss]. "
        f"{task} For each observation give start and end as mm:ss timestamps of the frames that show it "
        "(copy them from the labels; never invent times outside the frames you see) and a short description. "
        "Only report what is visible."
    )


def window_schema(input: VideoInput) -> dict[str, Any]:
    props: dict[str, Any] = {"start": _TS, "end": _TS,
                             "description": {"type": "string", "maxLength": input.max_text_chars}}
    required = ["start", "end", "description"]
    if input.kind in ("question", "moments"):
        props["relevant"] = {"type": "boolean"}
        required.append("relevant")
    if input.kind == "events" and input.json_schema is not None:
        props["event"] = {**input.json_schema, "additionalProperties": False}
        required.append("event")
    item = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    return {"type": "object", "properties": {"observations": {"type": "array", "maxItems": input.max_observations,
                                                              "items": item}},
            "required": ["observations"], "additionalProperties": False}


def answer_prompt(input: VideoInput) -> str:
    goal = ("Summarise the video." if input.kind == "summarize"
            else f"Answer the question: {input.question}")
    return (
        "You get a timeline of observations from a video, each with its time range. "
        f"{goal} Support every claim with citations of the timeline times (mm:ss) it comes from; say so when "
        "the timeline does not contain the answer."
    )


def answer_schema(input: VideoInput) -> dict[str, Any]:
    citation = {"type": "object", "properties": {"time": _TS, "claim": {"type": "string",
                                                                         "maxLength": input.max_text_chars}},
                "required": ["time", "claim"], "additionalProperties": False}
    return {"type": "object", "properties": {
        "answer": {"type": "string", "maxLength": input.max_text_chars * 4},
        "citations": {"type": "array", "maxItems": 12, "items": citation}},
        "required": ["answer", "citations"], "additionalProperties": False}
