"""The video agent end to end without Ray: the ingress over HTTP, a TaskRunner, the tiny checkpoint in the real
engine, the SDK; a generated clip with known scenes and burned-in timestamps."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

import kimiray
from pipelines.video.synthetic import make_video
from tests.task_server import task_server

KEY = "sk-video-e2e-001"


def test_video_question_end_to_end(tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.runtime.engine import AsyncEngine

    monkeypatch.setenv("KIMIRAY_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tiny-kimi-vl").symlink_to(tiny_checkpoint)
    engine = AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)
    clip = make_video(None, seconds=30, fps=5, size=(320, 240),
                      scenes=[(0.0, "intro", (20, 40, 220)), (10.0, "red car", (220, 30, 30)),
                              (20.0, "outro", (30, 200, 40))])
    options = {"kind": "question", "question": "When does the red car appear?", "max_frames": 16,
               "max_side": 224, "max_output_tokens": 160, "max_observations": 2, "max_text_chars": 40}
    with task_server(f"sqlite:///{tmp_path / 'stores'}", KEY, engine=engine) as url, \
            kimiray.Client(url, api_key=KEY) as client:
        ref = client.upload_file(clip.data, content_type="video/mp4")
        task = client.submit("video_analysis", {"blob": ref, **options})
        done = client.wait(task.id, timeout=600)
        assert done.status == "succeeded", done.error
        result = done.result
        assert abs(result["duration_s"] - 30) < 0.5 and 1 <= result["frames_sampled"] <= 16
        assert result["windows"] >= 1
        for entry in result["timeline"]:  # clamped to frames the model saw, whatever the random model says
            assert 0 <= entry["start"] <= entry["end"] <= 30 + 30 / result["frames_sampled"]
        assert isinstance(result["answer"], str)
        assert all(isinstance(c["supported"], bool) for c in result["citations"])
        events = list(client.stream_events(task.id))
        assert any(e.type == "progress" for e in events) and events[-1].data["status"] == "succeeded"
        sheet = client.download_artifact(task.id, "contact_sheet")
        assert Image.open(io.BytesIO(sheet)).format == "PNG"
        reply = client.chat("What happened?", session_id=done.session_id, max_tokens=3)
        assert reply.usage["prompt_tokens"] > 20
