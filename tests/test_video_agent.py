"""The video agent's logic with a scripted model that "sees" each frame's colour (so every timestamp can be
checked against the generated video's known scenes), on the embedded store and the real TaskRunner."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from agents.registry import build_registry
from agents.runner import RunnerOptions, TaskRunner
from connectors.model_client import ModelReply, ModelUnavailableError
from connectors.stores import open_stores
from connectors.stores.base import TaskSubmission
from engine.runtime.request import GenerateRequest, Usage
from pipelines.video.synthetic import make_video

OWNER = "key-video"
SCENES = [(0.0, "blue sky", (20, 40, 220)), (6.0, "red car", (220, 30, 30)), (13.0, "green field", (30, 200, 40))]


def _mmss(t: float) -> str:
    return f"{int(t) // 60:02d}:{int(t) % 60:02d}"


def _scene_of(image: Any) -> str:
    im = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image))
    r, g, b = im.convert("RGB").resize((8, 8)).getpixel((1, 1))
    return "red car" if r > max(g, b) else "green field" if g > max(r, b) else "blue sky"


class SeeingModel:
    """Window calls: one observation per frame, the scene read from the frame's colour, times from its label.
    Answer calls: cite the first timeline entry, plus a made-up time."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.requests: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest) -> ModelReply:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise ModelUnavailableError("replica restarting")
        self.requests.append(request)
        props = request.json_schema["properties"]
        if "observations" in props:
            parts = [p for m in request.messages if m["role"] == "user" for p in m["content"]]
            observations, label = [], None
            for part in parts:
                if part.get("type") == "text" and re.search(r"\[(\d+:)?\d+:\d\d\]", part["text"]):
                    label = re.search(r"\[((\d+:)?\d+:\d\d)\]", part["text"]).group(1)
                elif part.get("type") == "image" and label:
                    scene = _scene_of(part["image"])
                    obs = {"start": label, "end": label, "description": scene}
                    item = props["observations"]["items"]["properties"]
                    if "relevant" in item:
                        obs["relevant"] = scene == "red car"
                    if "event" in item:
                        obs["event"] = {"colour": scene.split()[0]}
                    observations.append(obs)
            text = json.dumps({"observations": observations})
        else:
            first = re.search(r"\[((\d+:)?\d+:\d\d)-", request.messages[-1]["content"]).group(1)
            text = json.dumps({"answer": "A blue sky, then a red car, then a green field.",
                               "citations": [{"time": first, "claim": "blue sky"},
                                             {"time": "59:00", "claim": "made up"}]})
        return ModelReply(text=text, finish_reason="stop", usage=Usage(prompt_tokens=500, completion_tokens=40))


@pytest.fixture(scope="module")
def video():
    return make_video(None, seconds=20, fps=5, size=(160, 120), scenes=SCENES)


def _input(data: bytes, **extra: Any) -> dict[str, Any]:
    return {"file": {"name": "clip.mp4", "data": base64.b64encode(data).decode()}, "max_frames": 20,
            "max_side": 160, **extra}


async def _run(tmp: Path, model: Any, input: dict[str, Any], runs: int = 1):
    stores = open_stores(f"sqlite:///{tmp}")
    runner = TaskRunner(stores, build_registry(), model, RunnerOptions(lease_s=30, retry_delay_s=0))
    record, _ = await stores.tasks.submit(OWNER, TaskSubmission(type="video_analysis", input=input))
    done = None
    for _ in range(runs):
        done = await runner.run_once()
    return stores, record, done


def _scene_at(t: float) -> str:
    return [label for start, label, _ in SCENES if start <= t + 1e-6][-1]


def test_summary_timeline_matches_the_scenes_and_citations_are_checked(tmp_path: Path, video) -> None:
    async def main() -> None:
        stores, _, done = await _run(tmp_path, SeeingModel(), _input(video.data))
        assert done.status == "succeeded", done.error
        result = done.result
        assert abs(result["duration_s"] - 20) < 0.5 and result["frames_sampled"] <= 20
        assert result["timeline"]
        for entry in result["timeline"]:  # every observation is at a time that really shows that scene
            assert 0 <= entry["start"] <= entry["end"] <= 20.5
            assert _scene_at(entry["start"]) == entry["description"], entry
        assert {e["description"] for e in result["timeline"]} == {label for _, label, _ in SCENES}
        supported = {c["claim"]: c["supported"] for c in result["citations"]}
        assert supported == {"blue sky": True, "made up": False}
        sheet = await stores.blobs.get(OWNER, result["artifacts"]["contact_sheet"]["ref"])
        assert Image.open(io.BytesIO(sheet)).format == "PNG"
        memory = await stores.sessions.messages(result["session_id"], OWNER)
        assert "red car" in memory[0].content
        await stores.close()

    asyncio.run(main())


def test_moments_are_time_ranges_of_the_matching_scene(tmp_path: Path, video) -> None:
    async def main() -> None:
        stores, _, done = await _run(tmp_path, SeeingModel(), _input(video.data, kind="moments",
                                                                    question="when is the red car visible?"))
        assert done.status == "succeeded", done.error
        moments = done.result["moments"]
        assert len(moments) == 1
        assert 5.0 <= moments[0]["start"] <= 7.5 and 11.0 <= moments[0]["end"] <= 14.0, moments
        await stores.close()

    asyncio.run(main())


def test_events_follow_the_schema(tmp_path: Path, video) -> None:
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["blue", "red", "green"]}},
              "required": ["colour"]}

    async def main() -> None:
        stores, _, done = await _run(tmp_path, SeeingModel(), _input(video.data, kind="events", schema=schema))
        assert done.status == "succeeded", done.error
        colours = {e["event"]["colour"] for e in done.result["events"]}
        assert colours == {"blue", "red", "green"}
        await stores.close()

    asyncio.run(main())


def test_interrupted_analysis_resumes_from_finished_windows(tmp_path: Path, video) -> None:
    async def main() -> None:
        model = SeeingModel(fail_on_call=3)
        small = _input(video.data, frames_per_window=6)
        stores, record, first = await _run(tmp_path, model, small)
        assert first.status == "queued"
        runner = TaskRunner(stores, build_registry(), model, RunnerOptions(lease_s=30))
        done = await runner.run_once()
        assert done.status == "succeeded", done.error
        progress = [e for e in await stores.tasks.events(record.id) if e.type == "progress"]
        assert done.result["windows"] >= 3
        assert sum("(reused)" in e.data["message"] for e in progress) == 2  # windows 1-2 were not redone
        await stores.close()

    asyncio.run(main())


def test_input_is_checked_at_submission() -> None:
    from agents.registry import InvalidTaskInput

    registry = build_registry()
    data = base64.b64encode(b"x").decode()
    for bad in ({"file": {"data": data}, "kind": "question"},
                {"file": {"data": data}, "schema": {"type": "object", "properties": {"a": {}}}},
                {"file": {"data": data}, "kind": "events", "schema": {"type": "array"}},
                {"url": "file:///etc/passwd"}, {}):
        with pytest.raises(InvalidTaskInput):
            registry.validate("video_analysis", bad)


@pytest.mark.parametrize("name", ["corrupt", "no_video_stream", "empty", "too_long", "resolution_too_large"])
def test_bad_videos_fail_clearly_and_fast(tmp_path: Path, name: str) -> None:
    import time

    from pipelines.video.synthetic import make_bad_videos

    path = make_bad_videos(tmp_path / "bad")[name]

    async def main() -> None:
        started = time.monotonic()
        stores, _, done = await _run(tmp_path / "stores", SeeingModel(), _input(path.read_bytes()))
        assert done.status == "failed" and done.error.code == name, done.error
        assert done.attempts == 1 and time.monotonic() - started < 20  # bounded work, not retried
        await stores.close()

    asyncio.run(main())


def test_a_truncated_video_is_analysed_up_to_the_cut(tmp_path: Path) -> None:
    from pipelines.video.synthetic import make_bad_videos

    path = make_bad_videos(tmp_path / "bad")["truncated"]

    async def main() -> None:
        stores, _, done = await _run(tmp_path / "stores", SeeingModel(), _input(path.read_bytes()))
        assert done.status in ("succeeded", "failed"), done
        if done.status == "failed":
            assert done.error.code == "corrupt"
        else:
            assert done.result["timeline"]
        await stores.close()

    asyncio.run(main())
