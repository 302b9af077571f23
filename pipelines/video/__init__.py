"""Video for Kimi-VL, which reads video as independent timestamped frames.

``decode``: bounded streaming decode (probe, limits, seek-based sampling). ``sample``: which frames to show
(uniform / shot boundaries / hybrid; dense times for a second look) and "mm:ss" time notation. ``transitions``: hard cuts vs fades, dissolves, flashes and motion. ``contact_sheet``: frames as one PNG grid.
``synthetic``: generated clips with known ground truth and broken files for tests.
"""

from pipelines.video.contact_sheet import contact_sheet
from pipelines.video.decode import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SECONDS,
    DecodeStats,
    Frame,
    VideoError,
    VideoInfo,
    check_limits,
    fit_size,
    iter_frames,
    probe,
)
from pipelines.video.sample import (
    Cut,
    TimeRange,
    dense_times,
    fetch_frames,
    format_ts,
    parse_ts,
    plan_times,
    sample_frames,
    scene_changes,
    scene_cuts,
    uniform_times,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SECONDS",
    "Cut",
    "DecodeStats",
    "Frame",
    "TimeRange",
    "VideoError",
    "VideoInfo",
    "check_limits",
    "contact_sheet",
    "dense_times",
    "fetch_frames",
    "fit_size",
    "format_ts",
    "iter_frames",
    "parse_ts",
    "plan_times",
    "probe",
    "sample_frames",
    "scene_changes",
    "scene_cuts",
    "uniform_times",
    "video_content_part",
]


def video_content_part(frames: "list[Frame]") -> dict:
    """The chat content part the processor expects: ``{"type": "video", "video": [...], "timestamps": [...]}``."""
    return {"type": "video", "video": [f.image for f in frames], "timestamps": [f.t for f in frames]}
