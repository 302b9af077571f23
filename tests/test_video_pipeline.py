"""Video pipeline: bounded streaming decode, sampling, scene cuts, bad inputs, contact sheet (generated clips)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from pipelines.video import (
    DecodeStats,
    TimeRange,
    VideoError,
    check_limits,
    contact_sheet,
    format_ts,
    iter_frames,
    parse_ts,
    probe,
    sample_frames,
    scene_changes,
    scene_cuts,
    uniform_times,
    video_content_part,
)
from pipelines.video.contact_sheet import sheet_layout
from pipelines.video.synthetic import (
    SyntheticVideo,
    _render,
    format_clock,
    make_bad_videos,
    make_video,
)

# Cuts deliberately off the 0.5 s probe grid.
SCENES = [(0.0, "blue sky", (30, 60, 200)), (3.3, "red car", (210, 30, 30)),
          (7.8, "green field", (40, 170, 60)), (12.6, "white wall", (235, 235, 235))]


@pytest.fixture(scope="module")
def clip() -> SyntheticVideo:
    return make_video(None, seconds=16, fps=10, scenes=SCENES)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_bad_videos(tmp_path_factory.mktemp("bad-videos"))


def corner_color(image: Image.Image) -> np.ndarray:
    """Mean colour of the top-left corner, away from the label and the clock."""
    return np.asarray(image, dtype=np.float32)[:4, :4].reshape(-1, 3).mean(0)


def assert_scene(video: SyntheticVideo, image: Image.Image, t: float, tol: float = 20) -> None:
    expected = np.array(video.scene_colors[video.scene_at(t)], dtype=np.float32)
    assert np.abs(corner_color(image) - expected).max() < tol, (t, corner_color(image), expected)


# ------------------------------------------------------------------------------------------------ probe / decode


def test_probe_reads_metadata(clip: SyntheticVideo) -> None:
    info = probe(clip.data)
    assert info.duration_s == pytest.approx(16.0, abs=0.11)
    assert info.fps == pytest.approx(10.0)
    assert (info.width, info.height) == (320, 240)
    assert info.codec == "h264" and "mp4" in info.container
    assert info.frame_count_estimate == 160
    assert info.has_audio is False and info.bytes == len(clip.data)


def test_probe_accepts_path(tmp_path: Path, clip: SyntheticVideo) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip.data)
    assert probe(path) == probe(clip.data)
    with pytest.raises(FileNotFoundError):
        probe(tmp_path / "missing.mp4")


def test_iter_frames_at_timestamps(clip: SyntheticVideo) -> None:
    targets = [0.0, 2.35, 3.3, 7.75, 12.01, 15.9]
    frames = list(iter_frames(clip.data, timestamps=targets, max_side=160))
    assert len(frames) == len(targets)
    for target, frame in zip(targets, frames):
        assert target - 1e-3 <= frame.t <= target + 0.1 + 1e-3  # first frame at/after: within one frame
        assert frame.index == round(frame.t * 10)
        assert frame.image.mode == "RGB" and frame.image.size == (160, 120)
        assert_scene(clip, frame.image, frame.t)


def test_iter_frames_all_and_every(clip: SyntheticVideo) -> None:
    every = list(iter_frames(clip.data, max_side=None))
    assert len(every) == 160 and every[0].image.size == (320, 240)
    assert [f.t for f in every] == pytest.approx([i / 10 for i in range(160)])
    sparse = list(iter_frames(clip.data, every_s=2.0, max_side=100))
    assert [f.t for f in sparse] == pytest.approx([0, 2, 4, 6, 8, 10, 12, 14])
    assert sparse[0].image.size == (100, 75)


def test_duplicate_and_out_of_range_targets(clip: SyntheticVideo) -> None:
    frames = list(iter_frames(clip.data, timestamps=[5.0, 5.0, 5.02, 99.0], max_side=64))
    assert [f.t for f in frames] == pytest.approx([5.0, 5.1])  # 5.02 -> next frame; 99 s is past the end


def test_burned_in_clock_matches_timestamp(clip: SyntheticVideo) -> None:
    """No OCR: the decoded frame is closest to a fresh render with its own "mm:ss", not a neighbouring second."""
    for frame in iter_frames(clip.data, timestamps=[1.5, 9.2, 13.0], max_side=None):
        k = clip.scene_at(frame.t)
        got = np.asarray(frame.image, dtype=np.float32)

        def dist(seconds: float) -> float:
            ref = _render(clip.size, clip.scene_colors[k], clip.scene_labels[k], format_clock(seconds))
            return float(np.abs(got - ref).mean())

        right = dist(frame.t)
        assert right < dist(frame.t + 1) and right < dist(frame.t - 1)


def test_seek_sampling_decodes_far_fewer_frames() -> None:
    """2 minutes at 5 fps, keyframe every 5 s: 8 sparse targets seek instead of decoding 600 frames."""
    long = make_video(None, seconds=120, fps=5, gop=25, scenes=[(0.0, "a", (200, 0, 0)), (60.0, "b", (0, 0, 200))])
    targets = [3.0, 17.0, 31.0, 45.0, 59.0, 73.0, 97.0, 115.0]
    sparse = DecodeStats()
    t0 = time.perf_counter()
    frames = list(iter_frames(long.data, timestamps=targets, max_side=64, stats=sparse))
    sparse_s = time.perf_counter() - t0
    assert [f.t for f in frames] == pytest.approx(targets)
    for f in frames:
        assert_scene(long, f.image, f.t)
    full = DecodeStats()
    t0 = time.perf_counter()
    no_seek = list(iter_frames(long.data, timestamps=targets, max_side=64, stats=full, seek_ahead_s=float("inf")))
    full_s = time.perf_counter() - t0
    assert [f.t for f in no_seek] == [f.t for f in frames]
    assert full.seeks == 0 and full.decoded == 576  # up to 115 s
    assert sparse.seeks >= 6 and sparse.decoded <= len(targets) * 25
    assert sparse.decoded * 5 < full.decoded and sparse_s < full_s


def test_seek_in_matroska() -> None:
    long = make_video(None, seconds=60, fps=5, gop=25, container="mkv",
                      scenes=[(0.0, "a", (200, 0, 0)), (30.0, "b", (0, 0, 200))])
    stats = DecodeStats()
    frames = list(iter_frames(long.data, timestamps=[2.0, 40.0, 55.0], max_side=64, stats=stats))
    assert [f.t for f in frames] == pytest.approx([2.0, 40.0, 55.0])
    assert_scene(long, frames[1].image, 40.0)
    assert stats.decoded < 150


@pytest.mark.parametrize(("codec", "container", "codec_name"), [
    ("libx264", "mp4", "h264"), ("libx264", "mkv", "h264"), ("libx264", "mov", "h264"),
    ("libvpx-vp9", "webm", "vp9"), ("mpeg4", "mp4", "mpeg4"), ("libsvtav1", "mkv", "av1"),
])
def test_container_codec_matrix(codec: str, container: str, codec_name: str) -> None:
    video = make_video(None, seconds=4, fps=10, codec=codec, container=container,
                       scenes=[(0.0, "one", (200, 40, 40)), (2.0, "two", (40, 40, 200))])
    info = probe(video.data)
    assert codec_name in info.codec or (codec_name == "av1" and "dav1d" in info.codec)
    assert info.duration_s == pytest.approx(4.0, abs=0.15) and (info.width, info.height) == (320, 240)
    frames = list(iter_frames(video.data, timestamps=[0.5, 3.0], max_side=160))
    assert [f.t for f in frames] == pytest.approx([0.5, 3.0])
    for f in frames:
        assert_scene(video, f.image, f.t, tol=30)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("name", "code"), [
    ("corrupt", "corrupt"), ("no_video_stream", "no_video_stream"), ("empty", "empty"), ("empty_mp4", "empty"),
    ("too_long", "too_long"), ("resolution_too_large", "resolution_too_large"),
])
def test_bad_videos_give_their_code(bad: dict[str, Path], name: str, code: str) -> None:
    if code in ("too_long", "resolution_too_large"):
        with pytest.raises(VideoError) as err:
            check_limits(probe(bad[name]))
    else:
        with pytest.raises(VideoError) as err:
            probe(bad[name])
    assert err.value.code == code
    with pytest.raises(VideoError) as err:
        list(iter_frames(bad[name]))
    assert err.value.code == code and isinstance(err.value, ValueError)


def test_truncated_mkv_decodes_up_to_the_cut(bad: dict[str, Path]) -> None:
    info = probe(bad["truncated"])  # header still claims the full 10 s
    assert info.duration_s == pytest.approx(10.0, abs=0.11)
    frames = list(iter_frames(bad["truncated"], max_side=64))
    assert 20 <= len(frames) < 100 and frames[-1].t < 8.0
    assert [f.t for f in frames] == sorted(f.t for f in frames)


def test_truncated_mp4_without_faststart_is_corrupt(tmp_path: Path) -> None:
    data = make_video(None, seconds=4, fps=10).data  # moov written at the end
    with pytest.raises(VideoError) as err:
        list(iter_frames(data[: len(data) // 2]))
    assert err.value.code == "corrupt"


def test_ten_hour_video_is_refused_quickly(bad: dict[str, Path]) -> None:
    t0 = time.perf_counter()
    assert probe(bad["too_long"]).duration_s == pytest.approx(36000, rel=1e-3)
    for call in (lambda: list(iter_frames(bad["too_long"])), lambda: sample_frames(bad["too_long"], budget=8)):
        with pytest.raises(VideoError) as err:
            call()
        assert err.value.code == "too_long"
    assert time.perf_counter() - t0 < 2.0
    # A raised limit reads it: 60 frames, one per 10 min, sampled by seeking.
    frames = list(iter_frames(bad["too_long"], timestamps=[0, 18000, 35400], max_side=64, max_seconds=None))
    assert [f.t for f in frames] == pytest.approx([0, 18000, 35400])


def test_8k_refused_from_metadata_alone(bad: dict[str, Path]) -> None:
    info = probe(bad["resolution_too_large"])
    assert (info.width, info.height) == (7680, 4320)
    stats = DecodeStats()
    with pytest.raises(VideoError) as err:
        list(iter_frames(bad["resolution_too_large"], stats=stats))
    assert err.value.code == "resolution_too_large" and "7680x4320" in str(err.value)
    assert stats.packets == 0 and stats.decoded == 0
    check_limits(info, max_pixels=None)  # opt-in
    check_limits(probe(make_video(None, seconds=0.1, fps=10, size=(3840, 2160), burn_timestamp=False).data))


def test_too_large_bytes(clip: SyntheticVideo) -> None:
    with pytest.raises(VideoError) as err:
        list(iter_frames(clip.data, max_bytes=1000))
    assert err.value.code == "too_large"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc for RSS")
def test_memory_bounded_on_1080p(tmp_path: Path) -> None:
    """30 s of 1080p: resident memory stays flat while streaming (frames are not accumulated)."""
    path = tmp_path / "hd.mp4"
    make_video(path, seconds=30, fps=10, size=(1920, 1080))
    base = peak = _rss()
    stats = DecodeStats()
    for _ in iter_frames(path, every_s=0.25, stats=stats):
        peak = max(peak, _rss())
    assert stats.decoded == 300 and stats.kept == 120
    assert peak - base < 200 * 1024**2, f"RSS grew {(peak - base) / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------------- sampling


def test_scene_changes_find_cuts_without_false_ones(clip: SyntheticVideo) -> None:
    cuts = scene_changes(clip.data)
    assert len(cuts) == 3
    for found, true in zip(cuts, clip.scene_starts[1:]):
        assert true <= found <= true + 0.5 + 1e-6  # first probe after the cut
    still = make_video(None, seconds=10, fps=10, scenes=[(0.0, "one long shot", (120, 80, 40))])
    assert scene_changes(still.data) == []  # the ticking clock is not a cut


def test_scene_cut_scores() -> None:
    video = make_video(None, seconds=6, fps=10, scenes=[(0.0, "a", (200, 0, 0)), (3.0, "b", (0, 0, 200))])
    cuts = scene_cuts(video.data)
    assert len(cuts) == 1 and cuts[0].t == pytest.approx(3.0) and cuts[0].score > 0.5


@pytest.mark.parametrize("budget", [2, 4, 6, 12])
def test_hybrid_sampling(clip: SyntheticVideo, budget: int) -> None:
    frames = sample_frames(clip.data, budget=budget, strategy="hybrid", max_side=128)
    times = [f.t for f in frames]
    assert 0 < len(frames) <= budget
    assert times == sorted(set(times)) and len({f.index for f in frames}) == len(frames)
    assert all(f.image.size == (128, 96) for f in frames)
    if budget >= 4:  # start + 3 cuts fit: a frame within 0.5 s after every cut
        for cut in clip.scene_starts[1:]:
            assert any(cut <= t <= cut + 0.5 for t in times), (cut, times)
            assert_scene(clip, next(f for f in frames if cut <= f.t).image, cut + 0.01)
    if budget == 12:
        assert len(frames) == 12
    part = video_content_part(frames)
    assert part["type"] == "video" and part["timestamps"] == times and len(part["video"]) == len(frames)


def test_uniform_and_scenes_strategies(clip: SyntheticVideo) -> None:
    uniform = sample_frames(clip.data, budget=4, strategy="uniform", max_side=64)
    assert [f.t for f in uniform] == pytest.approx([2.0, 6.0, 10.0, 14.0])
    scenes = sample_frames(clip.data, budget=10, strategy="scenes", max_side=64)
    assert len(scenes) == 4 and scenes[0].t == 0.0


def test_uniform_times() -> None:
    assert uniform_times(10, budget=5) == pytest.approx([1, 3, 5, 7, 9])
    assert uniform_times(10, fps=0.5) == pytest.approx([1, 3, 5, 7, 9])
    assert len(uniform_times(100, fps=2, budget=16)) == 16
    assert uniform_times(3.0) == pytest.approx([0.5, 1.5, 2.5])
    assert uniform_times(0) == [0.0]


def test_time_notation() -> None:
    assert format_ts(65.9) == "01:05" and format_ts(0) == "00:00"
    assert format_ts(3725) == "1:02:05"
    assert parse_ts("01:05") == 65.0 and parse_ts("1:02:05") == 3725.0
    assert parse_ts("65s") == 65.0 and parse_ts("65") == 65.0 and parse_ts("1m5s") == 65.0
    assert parse_ts("2.5") == 2.5 and parse_ts(7) == 7.0
    for bad_text in ("", "abc", "1:2:3:4", "-5", "1:xx"):
        with pytest.raises(ValueError):
            parse_ts(bad_text)
    r = TimeRange(start="00:05", end=70)
    assert (r.start, r.end, r.duration) == (5.0, 70.0, 65.0) and r.format() == "00:05-01:10"
    assert r.contains(6) and not r.contains(71)
    with pytest.raises(ValueError):
        TimeRange(start=10, end=5)


# ---------------------------------------------------------------------------------------------- contact sheet


def test_contact_sheet_png(clip: SyntheticVideo) -> None:
    frames = sample_frames(clip.data, budget=6, max_side=320)
    items = [(f.t, f.image, f"caption {i}" if i % 2 else None) for i, f in enumerate(frames)]
    png = contact_sheet(items, columns=4, thumb_width=120)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    sheet = Image.open(io.BytesIO(png))
    width, height, _, _ = sheet_layout(items, columns=4, thumb_width=120)
    assert sheet.size == (width, height)
    assert width == 8 + 4 * 128 and height > 2 * 90
    # First thumbnail shows the first scene's colour.
    pixel = np.asarray(sheet.convert("RGB"), dtype=np.float32)[12, 12]
    assert np.abs(pixel - np.array(clip.scene_colors[0])).max() < 25
    with pytest.raises(ValueError):
        contact_sheet([])



def test_contact_sheet_cells_locate_each_frame(clip: SyntheticVideo) -> None:
    """``sheet_cells`` names where each frame was drawn: a cell's top-left pixel shows that frame's scene colour."""
    from pipelines.video.contact_sheet import sheet_cells

    frames = sample_frames(clip.data, budget=6, max_side=320)
    items = [(f.t, f.image, None) for f in frames]
    sheet = np.asarray(Image.open(io.BytesIO(contact_sheet(items, columns=4, thumb_width=120))).convert("RGB"),
                       dtype=np.float32)
    cells = sheet_cells(items, columns=4, thumb_width=120)
    assert len(cells) == len(items)
    for (x0, y0, x1, y1), frame in zip(cells, frames):
        assert 0 <= x0 < x1 <= sheet.shape[1] and 0 <= y0 < y1 <= sheet.shape[0]
        expected = np.asarray(frame.image.convert("RGB"), dtype=np.float32)[4, 4]
        assert np.abs(sheet[y0 + 4, x0 + 4] - expected).max() < 30
    assert len({c[:2] for c in cells}) == len(cells)  # no two frames share a cell


def test_av_is_the_decoder() -> None:
    assert av.codec.Codec("h264", "r").name == "h264"
