"""Bounded, streaming video decoding with PyAV.

Kimi-VL reads video as independent frames, so all we need from a file is a handful of RGB images with their
timestamps. Two rules keep this safe on arbitrary uploads:

* **Refuse early from metadata.** :func:`probe` reads only the container header; :func:`check_limits` refuses
  files over ``max_bytes``, longer than ``max_seconds`` (default 3 h, so a 10-hour upload fails in milliseconds)
  or with frames over ``max_pixels`` (default ``2 * 3840*2160`` = 16.6 MP: 4K passes, 8K's 33 MP is refused
  with ``resolution_too_large`` before a single frame is decoded).
* **Stream.** :func:`iter_frames` demuxes packet by packet and holds only the current frame; pixels are converted
  (scaled to ``max_side`` and RGB in one ``reformat``) only for frames that are kept. With sparse
  ``timestamps`` it seeks to the keyframe before a target more than ``seek_ahead_s`` ahead instead of decoding
  everything in between, and stops as soon as the last target is served.

Broken input maps to :class:`VideoError` codes: ``corrupt`` (nothing decodes), ``no_video_stream`` (audio only),
``empty`` (a video stream/header but no frames), ``too_long``, ``too_large``, ``resolution_too_large``. A truncated
file yields the frames before the cut and is only ``corrupt`` if none decodes. Frame times are
``pts * time_base`` relative to the stream's start time, so the first frame is at ~0 s.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import av
from PIL import Image
from pydantic import BaseModel

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SECONDS",
    "DecodeStats",
    "Frame",
    "Source",
    "VideoError",
    "VideoInfo",
    "check_limits",
    "iter_frames",
    "probe",
]

Source = bytes | bytearray | memoryview | str | os.PathLike[str]
ErrorCode = Literal["corrupt", "no_video_stream", "empty", "too_long", "too_large", "resolution_too_large"]

DEFAULT_MAX_SECONDS = 3 * 3600.0
DEFAULT_MAX_PIXELS = 2 * 3840 * 2160
DEFAULT_MAX_BYTES = 4 * 1024**3
MAX_BAD_PACKETS = 64  # consecutive undecodable packets before we call the rest of the file garbage


class VideoError(ValueError):
    """A video we refuse or cannot read; ``code`` is a short machine-readable reason."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code

    def __repr__(self) -> str:
        return f"VideoError({str(self)!r}, code={self.code!r})"


class VideoInfo(BaseModel):
    """Container metadata of the first video stream (no frames decoded)."""

    duration_s: float
    fps: float | None
    width: int
    height: int
    codec: str
    container: str
    frame_count_estimate: int
    has_audio: bool
    bytes: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass
class Frame:
    """A kept frame. ``index`` is the frame number ``round(t * fps)`` (decode order when fps is unknown)."""

    t: float
    image: Image.Image
    index: int


@dataclass
class DecodeStats:
    """Counters filled by :func:`iter_frames`, so callers and tests can see how much work a sampling cost."""

    packets: int = 0
    decoded: int = 0
    kept: int = 0
    seeks: int = 0
    bad_packets: int = 0
    last_t: float | None = None
    info: VideoInfo | None = field(default=None)


def _size_of(source: Source) -> int:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source)
    return os.path.getsize(source)


def _open(source: Source) -> Any:
    """Open for reading, mapping demuxer failures to VideoError (a missing path stays FileNotFoundError)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        target: Any = io.BytesIO(bytes(source))
    else:
        target = str(Path(source))
        if not os.path.exists(target):
            raise FileNotFoundError(target)
    try:
        return av.open(target, mode="r")
    except av.error.EOFError:
        raise VideoError("the file ends before any frame (header only)", "empty") from None
    except av.error.FFmpegError as exc:
        raise VideoError(f"not a decodable video: {exc.strerror or exc}", "corrupt") from None


def _video_stream(container: Any) -> Any:
    """The first real video stream (cover art attached to audio files does not count)."""
    attached = getattr(getattr(av.stream, "Disposition", None), "attached_pic", None)
    for stream in container.streams.video:
        if attached is not None and stream.disposition & attached:
            continue
        return stream
    if not container.streams:
        raise VideoError("the container holds no streams at all", "empty")
    raise VideoError("the file has no video stream (audio only?)", "no_video_stream")


def _info(container: Any, stream: Any, size: int) -> VideoInfo:
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else None
    frames = int(stream.frames or 0) or (round(duration * fps) if fps else 0)
    ctx = stream.codec_context
    return VideoInfo(
        duration_s=max(0.0, duration), fps=fps, width=int(ctx.width or 0), height=int(ctx.height or 0),
        codec=ctx.name or "unknown", container=container.format.name, frame_count_estimate=frames,
        has_audio=bool(container.streams.audio), bytes=size,
    )


def probe(source: Source) -> VideoInfo:
    """Read container metadata only. Raises VideoError for corrupt/audio-only/empty files."""
    size = _size_of(source)
    with _open(source) as container:
        info = _info(container, _video_stream(container), size)
    if info.duration_s <= 0 and info.frame_count_estimate <= 0:
        raise VideoError("the video stream has no frames and no duration", "empty")
    return info


def check_limits(
    info: VideoInfo,
    *,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> None:
    """Refuse from metadata alone, before any frame is decoded."""
    if max_bytes is not None and info.bytes > max_bytes:
        raise VideoError(f"file of {info.bytes} bytes is over the limit of {max_bytes}", "too_large")
    if max_seconds is not None and info.duration_s > max_seconds:
        raise VideoError(f"video lasts {info.duration_s:.0f} s, over the limit of {max_seconds:.0f} s", "too_long")
    if max_pixels is not None and info.pixels > max_pixels:
        raise VideoError(f"frames of {info.width}x{info.height} ({info.pixels / 1e6:.1f} MP) exceed "
                         f"{max_pixels / 1e6:.1f} MP", "resolution_too_large")


def fit_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Scale so the longer side is at most ``max_side``, keeping the aspect ratio (never upscales)."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _targets(timestamps: Sequence[float] | None, every_s: float | None, duration: float) -> Iterator[float] | None:
    if timestamps is not None and every_s is not None:
        raise ValueError("give timestamps or every_s, not both")
    if timestamps is not None:
        return iter(sorted({max(0.0, float(t)) for t in timestamps}))
    if every_s is not None:
        if not (every_s > 0 and math.isfinite(every_s)):
            raise ValueError("every_s must be a positive number")
        return (k * every_s for k in range(math.floor(duration / every_s) + 1 if duration > 0 else 10**12))
    return None


def _keyframe_ahead(stream: Any, target: float, now: float, start: int) -> bool:
    """Whether a keyframe lies in ``(now, target]``, per the demuxer's index. A seek to the keyframe before
    ``target`` only pays when that keyframe is ahead of us; an unknown index (e.g. Matroska before its cues
    are read) says yes and lets ``no_seek_until`` bound the waste."""
    try:
        entries = stream.index_entries
        if len(entries) < 2:
            return True
        k = entries.search_timestamp(int(target / stream.time_base) + start, backward=True)
        if k < 0:
            return True
        return float((entries[k].timestamp - start) * stream.time_base) > now + 1e-6
    except Exception:  # older PyAV without index access
        return True


def iter_frames(
    source: Source,
    *,
    timestamps: Sequence[float] | None = None,
    every_s: float | None = None,
    max_side: int | None = 896,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    seek_ahead_s: float = 5.0,
    stats: DecodeStats | None = None,
) -> Iterator[Frame]:
    """Yield frames in time order: every frame, or the first frame at/after each of ``timestamps`` (or every
    ``every_s`` seconds). A frame serving several targets is yielded once. Images are RGB, longer side
    <= ``max_side``."""
    stats = stats if stats is not None else DecodeStats()
    if max_bytes is not None and _size_of(source) > max_bytes:
        raise VideoError(f"file of {_size_of(source)} bytes is over the limit of {max_bytes}", "too_large")
    with _open(source) as container:
        stream = _video_stream(container)
        info = stats.info = _info(container, stream, _size_of(source))
        check_limits(info, max_seconds=max_seconds, max_pixels=max_pixels, max_bytes=max_bytes)
        stream.thread_type = "AUTO"
        tb = stream.time_base
        start = stream.start_time if stream.start_time is not None else 0
        targets = _targets(timestamps, every_s, info.duration_s)
        target = next(targets, None) if targets is not None else None
        if targets is not None and target is None:
            return
        last_t = 0.0
        last_yield = -math.inf
        no_seek_until = -math.inf
        seq = 0
        bad_run = 0
        restart = True
        while restart:
            restart = False
            for packet in container.demux(stream):
                stats.packets += 1
                try:
                    decoded = packet.decode()
                except av.error.FFmpegError:
                    stats.bad_packets += 1
                    bad_run += 1
                    if bad_run > MAX_BAD_PACKETS:
                        break
                    continue
                bad_run = 0
                for frame in decoded:
                    stats.decoded += 1
                    if frame.pts is not None and tb:
                        t = max(0.0, float((frame.pts - start) * tb))
                    else:
                        t = seq / (info.fps or 1.0)
                    seq += 1
                    stats.last_t = last_t = t
                    if max_seconds is not None and t > max_seconds:
                        raise VideoError(f"video runs past {max_seconds:.0f} s", "too_long")
                    if t <= last_yield:  # re-decoded after a backward keyframe seek
                        continue
                    if target is not None:
                        if t < target - 1e-3:
                            continue
                        while target is not None and target <= t + 1e-3:
                            target = next(targets, None)  # type: ignore[arg-type]
                    index = round(t * info.fps) if info.fps else seq - 1
                    size = fit_size(frame.width, frame.height, max_side)
                    image = frame.reformat(width=size[0], height=size[1], format="rgb24").to_image()
                    stats.kept += 1
                    last_yield = t
                    yield Frame(t=t, image=image, index=index)
                    if targets is not None and target is None:
                        return
                if (target is not None and target - last_t > seek_ahead_s and target > no_seek_until
                        and _keyframe_ahead(stream, target, last_t, start)):
                    container.seek(int(target / tb) + start, stream=stream, backward=True, any_frame=False)
                    stats.seeks += 1
                    no_seek_until = target  # decode forward from the keyframe; never seek twice for one target
                    restart = True
                    break
        if stats.decoded == 0:
            if stats.bad_packets:
                raise VideoError("no frame could be decoded", "corrupt")
            raise VideoError("the video stream has no frames", "empty")
