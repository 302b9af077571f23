"""The second look with a scripted model that answers from the frames it is shown (it reads each frame's colour
and label): a short event that the coarse pass sees once is refined by the dense pass to within its resolution;
passes are reported, resumable, and bounded by the frame and token budgets; long videos are sampled by seeking."""

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
from pipelines.video.decode import DecodeStats
from pipelines.video.sample import fetch_frames, uniform_times
from pipelines.video.synthetic import make_video

OWNER = "key-second-look"
EVENT = (97.0, 104.0)  # the red car is on screen from 01:37 to 01:44 of a 3-minute video
SCENES = [(0.0, "street", (20, 40, 220)), (EVENT[0], "red car", (220, 30, 30)), (EVENT[1], "street", (20, 40, 220))]
LABEL = re.compile(r"\[((\d+:)?\d+:\d\d)\]")


def _is_red(image: Any) -> bool:
    im = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image))
    r, g, b = im.convert("RGB").resize((8, 8)).getpixel((1, 1))
    return r > max(g, b)


class FrameReader:
    """Window calls: one observation per frame (its label's time, "red car" when the frame is red, relevant
    then). Answer calls: cite the first relevant entry of the timeline it is given."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.frames_seen: list[int] = []

    async def generate(self, request: GenerateRequest) -> ModelReply:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise ModelUnavailableError("replica restarting")
        if "observations" in request.json_schema["properties"]:
            parts = [p for m in request.messages if m["role"] == "user" for p in m["content"]]
            observations, label = [], None
            for part in parts:
                if part.get("type") == "text" and LABEL.search(part["text"]):
                    label = LABEL.search(part["text"]).group(1)
                elif part.get("type") == "image" and label:
                    red = _is_red(part["image"])
                    observations.append({"start": label, "end": label, "relevant": red,
                                         "description": "red car" if red else "street"})
            self.frames_seen.append(len(observations))
            text = json.dumps({"observations": observations})
        else:
            timeline = request.messages[-1]["content"]
            hit = re.search(r"\[((\d+:)?\d+:\d\d)-[^\]]*\] red car", timeline)
            text = json.dumps({"answer": "The red car passes." if hit else "Not seen.",
                               "citations": [{"time": hit.group(1), "claim": "red car"}] if hit else []})
        return ModelReply(text=text, finish_reason="stop", usage=Usage(prompt_tokens=300, completion_tokens=40))


@pytest.fixture(scope="module")
def video():
    return make_video(None, seconds=180, fps=4, size=(96, 64), scenes=SCENES)


def _input(data: bytes, **extra: Any) -> dict[str, Any]:
    return {"file": {"name": "street.mp4", "data": base64.b64encode(data).decode()}, "max_frames": 12,
            "strategy": "uniform", "max_side": 96, "dense_frames": 30, "frames_per_window": 8, **extra}


async def _run(tmp: Path, model: Any, input: dict[str, Any]):
    stores = open_stores(f"sqlite:///{tmp}")
    runner = TaskRunner(stores, build_registry(), model, RunnerOptions(lease_s=30, retry_delay_s=0))
    record, _ = await stores.tasks.submit(OWNER, TaskSubmission(type="video_analysis", input=input))
    return stores, runner, record, await runner.run_once()


@pytest.mark.parametrize("kind", ["moments", "question"])
def test_the_second_look_refines_the_event_to_its_resolution(tmp_path: Path, video, kind: str) -> None:
    async def main() -> None:
        model = FrameReader()
        stores, _, record, done = await _run(tmp_path, model, _input(video.data, kind=kind,
                                                                     question="When does the red car pass?"))
        assert done.status == "succeeded", done.error
        coarse, dense = done.result["passes"]
        assert coarse["name"] == "coarse" and coarse["frames"] == 12 and coarse["resolution_s"] == 15.0
        assert dense["name"] == "dense" and 0 < dense["frames"] <= 30 and dense["resolution_s"] <= 1.1
        assert len(dense["segments"]) == 1 and dense["segments"][0]["start"] <= EVENT[0] <= EVENT[1] <= \
            dense["segments"][0]["end"]
        assert done.result["frames_sampled"] == coarse["frames"] + dense["frames"]
        assert sum(model.frames_seen) == done.result["frames_sampled"]  # every frame shown once
        res = dense["resolution_s"]
        if kind == "moments":
            (moment,) = done.result["moments"]
            assert moment["found_in"] == "dense" and moment["resolution_s"] == res
            assert abs(moment["start"] - EVENT[0]) <= res, moment  # the coarse pass alone: 15 s off
            assert abs(moment["end"] - EVENT[1]) <= res + 1.0, moment  # + the label's whole second
        else:
            cited = [c["time"] for c in done.result["citations"] if c["supported"]]
            assert cited and all(abs(t - EVENT[0]) <= res for t in cited), done.result["citations"]
        events = await stores.tasks.events(record.id)
        passes = [(e.data["name"], e.data["status"]) for e in events if e.type == "pass"]
        assert passes == [("coarse", "started"), ("coarse", "done"), ("dense", "started"), ("dense", "done")]
        positions = [e.data["position_s"] for e in events if e.type == "sampling"]
        assert positions and all(0 <= p <= 180 for p in positions)  # where decoding is, in video seconds
        await stores.close()

    asyncio.run(main())


def test_an_interrupted_second_look_resumes_without_redoing_the_coarse_pass(tmp_path: Path, video) -> None:
    async def main() -> None:
        model = FrameReader(fail_on_call=4)  # 2 coarse windows and the first dense window succeed, then a failure
        stores, runner, record, first = await _run(tmp_path, model, _input(video.data, kind="moments",
                                                                           question="the red car"))
        assert first.status == "queued"
        calls_before = model.calls
        done = await runner.run_once()
        assert done.status == "succeeded", done.error
        progress = [e.data["message"] for e in await stores.tasks.events(record.id) if e.type == "progress"]
        assert sum(m.startswith("window") and "(reused)" in m for m in progress) == 2
        assert sum(m.startswith("dense window") and "(reused)" in m for m in progress) == 1
        assert model.calls - calls_before == done.result["passes"][1]["windows"] - 1  # only unfinished ones
        await stores.close()

    asyncio.run(main())


def test_the_token_budget_bounds_the_second_look(tmp_path: Path, video) -> None:
    async def main() -> None:
        model = FrameReader()
        stores, _, _, done = await _run(tmp_path, model, _input(video.data, kind="moments", question="red car",
                                                               max_total_tokens=1000))
        assert done.status == "succeeded", done.error
        assert done.result["passes"][1] == {"name": "dense", "skipped": "no token budget left after the coarse pass"}
        assert [m["found_in"] for m in done.result["moments"]] == ["coarse"]
        await stores.close()

    asyncio.run(main())


def test_sparse_sampling_of_a_long_gop_video_decodes_a_bounded_number_of_frames() -> None:
    # 20 minutes at 2 fps with a keyframe every 60 s: sampling 16 frames must seek, not decode all 2,400
    clip = make_video(None, seconds=1200, fps=2, size=(64, 48), scenes=[(0.0, "long", (90, 90, 90))], gop=120)
    stats = DecodeStats()
    frames = fetch_frames(clip.data, uniform_times(clip.duration, budget=16), max_side=64, stats=stats)
    assert len(frames) == 16
    assert stats.seeks >= 8
    assert stats.decoded <= 16 * (120 + 1)  # at most one keyframe interval per sample
    assert stats.decoded < 2400 / 2


def test_coarse_to_fine_narrows_in_on_the_edges_of_a_short_event_in_a_long_video(tmp_path: Path) -> None:
    event = (733.0, 751.0)  # 18 s of red car in 20 minutes; the coarse pass sees one frame every 100 s
    clip = make_video(None, seconds=1200, fps=1, size=(64, 48), gop=30,
                      scenes=[(0.0, "street", (20, 40, 220)), (event[0], "red car", (220, 30, 30)),
                              (event[1], "street", (20, 40, 220))])

    async def main() -> None:
        stores, _, _, done = await _run(tmp_path, FrameReader(), _input(
            clip.data, kind="moments", question="the red car", max_side=64, dense_frames=16, max_passes=3))
        assert done.status == "succeeded", done.error
        names = [p["name"] for p in done.result["passes"]]
        assert names == ["coarse", "dense", "dense2"], done.result["passes"]
        res = [p["resolution_s"] for p in done.result["passes"]]
        assert res[0] > res[1] > res[2]
        edges = done.result["passes"][2]["segments"]  # around both edges (merged when they overlap)
        assert {s["why"] for s in edges} == {"edge"}
        assert all(any(s["start"] <= t <= s["end"] for s in edges) for t in event), edges
        (moment,) = done.result["moments"]
        assert moment["resolution_s"] == pytest.approx(res[2], abs=0.01)
        assert abs(moment["start"] - event[0]) <= moment["resolution_s"], moment
        assert abs(moment["end"] - event[1]) <= moment["resolution_s"] + 1.0, moment
        for p in done.result["passes"]:  # bounded decoding: seeks, never the whole 1,200 frames
            assert p["decoded_frames"] <= p["frames"] * 31 and p["decoded_frames"] < 600
        await stores.close()

    asyncio.run(main())


def test_dense_times_respect_the_budget_the_frame_rate_and_whole_seconds() -> None:
    from pipelines.video.sample import TimeRange, dense_times

    segs = [TimeRange(start=10, end=40), TimeRange(start=100, end=110)]
    plan = dense_times(segs, 20, fps=25)
    assert sum(len(t) for _, t, _ in plan) <= 20 and [len(t) for _, t, _ in plan] == [15, 5]
    assert all(s.start <= t <= s.end for s, ts, _ in plan for t in ts)
    assert [r for _, _, r in plan] == [2.0, 2.0]
    (_, times, res), = dense_times([TimeRange(start=0, end=5)], 50, fps=25)  # never finer than 1 s labels
    assert len(times) == 5 and res == 1.0
    (_, times, _), = dense_times([TimeRange(start=0, end=5)], 50, fps=25, exclude=[0.5, 1.5])
    assert times == [2.5, 3.5, 4.5]


def test_segments_come_from_relevant_observations_and_cited_times_merged_and_capped() -> None:
    from agents.video.second_look import pick_segments
    from agents.video.timeline import Observation

    obs = [Observation(start=t, end=t, description="x", relevant=rel, window=0)
           for t, rel in [(10, False), (20, True), (25, True), (60, True), (90, False)]]
    segs = pick_segments(obs, [88.0], 5.0, 92.0, limit=4)
    assert [(s.start, s.end, s.why) for s in segs] == [(15, 30, "relevant"), (55, 65, "relevant"), (83, 92, "cited")]
    assert [(s.start, s.end) for s in pick_segments(obs, [88.0], 5.0, 92.0, limit=1)] == [(15, 30)]
