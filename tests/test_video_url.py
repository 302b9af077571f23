"""Video URLs (data: here) are decoded with PyAV and sampled to frames; duration limits hold."""

from __future__ import annotations

import asyncio
import base64

import pytest

from connectors.limits import Limits
from connectors.media import MediaError, load_video_part
from tests.media_helpers import make_video


def _part(data: bytes) -> dict:
    return {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}


def test_video_url_is_sampled_to_frames() -> None:
    frames = asyncio.run(load_video_part(_part(make_video(4.0)), Limits(max_video_frames=8)))
    assert 1 <= len(frames.frames) <= 8
    assert frames.timestamps is not None and list(frames.timestamps) == sorted(frames.timestamps)
    assert frames.timestamps[-1] <= 4.0
    shades = {frame.getpixel((5, 5))[0] // 30 for frame in frames.frames}
    assert len(shades) >= 3  # frames from different seconds, not one repeated frame


def test_video_too_long_and_garbage() -> None:
    with pytest.raises(MediaError) as info:
        asyncio.run(load_video_part(_part(make_video(3.0)), Limits(max_video_seconds=1.0)))
    assert info.value.status_code == 413 and info.value.code == "video_too_long"
    with pytest.raises(MediaError) as info:
        asyncio.run(load_video_part(_part(b"definitely not a video" * 10), Limits()))
    assert info.value.status_code in (400, 415)
