"""Synthetic videos with known ground truth (scene cuts, colours, burned-in clock) and broken files.

Tests and demos need videos whose content is known exactly, generated in well under a second: each scene is a
solid colour with a big label ("SCENE 2: red car") and every frame carries its own "mm:ss" clock. Frames are
built once per (scene, second) and reused, so even 1080p clips encode quickly (libx264 ``ultrafast``).

:func:`make_bad_videos` writes one file per :class:`~pipelines.video.decode.VideoError` code. Truncation is done on
Matroska, which survives being cut (an mp4 with its ``moov`` index at the end becomes undecodable when cut).
"""

from __future__ import annotations

import io
import math
import os
import random
from fractions import Fraction
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict

__all__ = ["SyntheticVideo", "make_video", "make_bad_videos", "make_edited_video", "encode_frames", "EditedVideo", "make_long_video", "make_8k_video", "DEFAULT_SCENES",
           "format_clock"]

_FORMATS = {"mp4": "mp4", "mkv": "matroska", "webm": "webm", "mov": "mov"}

DEFAULT_SCENES: list[tuple[float, str, tuple[int, int, int]]] = [
    (0.0, "blue sky", (30, 60, 200)),
    (5.0, "red car", (210, 30, 30)),
    (11.0, "green field", (40, 170, 60)),
    (16.0, "white wall", (235, 235, 235)),
]


class SyntheticVideo(BaseModel):
    """An encoded synthetic clip and its ground truth."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    data: bytes
    path: Path | None = None
    duration: float
    fps: float
    size: tuple[int, int]
    codec: str
    container: str
    scene_starts: list[float]
    scene_labels: list[str]
    scene_colors: list[tuple[int, int, int]]

    def scene_at(self, t: float) -> int:
        """Index of the scene shown at ``t`` seconds."""
        k = 0
        for i, start in enumerate(self.scene_starts):
            if t >= start:
                k = i
        return k


def format_clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _render(size: tuple[int, int], color: tuple[int, int, int], label: str, clock: str | None) -> np.ndarray:
    w, h = size
    im = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(im)
    ink = (0, 0, 0) if sum(color) > 384 else (255, 255, 255)
    big = max(10, h // 10)
    draw.text((w // 20, h // 3), label, fill=ink, font=_font(big))
    if clock is not None:
        draw.text((w // 20, h - h // 6), clock, fill=ink, font=_font(max(10, h // 12)))
    return np.asarray(im)


def _to_yuv(rgb: np.ndarray) -> np.ndarray:
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()


def make_video(
    path: str | os.PathLike[str] | None = None,
    *,
    seconds: float = 20,
    fps: float = 10,
    size: tuple[int, int] = (320, 240),
    scenes: list[tuple[float, str, tuple[int, int, int]]] | None = None,
    codec: str = "libx264",
    container: str = "mp4",
    burn_timestamp: bool = True,
    gop: int | None = None,
    faststart: bool = False,
) -> SyntheticVideo:
    """Encode a solid-colour multi-scene clip; write it to ``path`` when given. ``fps`` may be fractional
    (e.g. 1/600 for one frame per 10 minutes). ``gop`` bounds the keyframe interval (frames)."""
    if container not in _FORMATS:
        raise ValueError(f"container must be one of {sorted(_FORMATS)}")
    if size[0] % 2 or size[1] % 2:
        raise ValueError("size must be even for yuv420p")
    scenes = sorted(scenes if scenes is not None else DEFAULT_SCENES)
    if not scenes or scenes[0][0] > 0:
        scenes.insert(0, (0.0, "start", (0, 0, 0)))
    labels = [f"SCENE {i + 1}: {name}" for i, (_, name, _) in enumerate(scenes)]
    rate = Fraction(fps).limit_denominator(10_000)
    n = max(0, math.ceil(seconds * fps - 1e-9))
    buf = io.BytesIO()
    options = {"movflags": "faststart"} if faststart and container in ("mp4", "mov") else {}
    with av.open(buf, mode="w", format=_FORMATS[container], options=options) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate
        opts: dict[str, str] = {}
        if codec == "libx264":
            opts = {"preset": "ultrafast", "tune": "zerolatency"}
        elif codec == "libvpx-vp9":
            opts = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        elif codec == "libsvtav1":
            opts = {"preset": "12"}
        stream.codec_context.options = opts
        if gop is not None:
            stream.codec_context.gop_size = gop
        cache: dict[tuple[int, str | None], np.ndarray] = {}
        for i in range(n):
            t = float(i / rate)
            k = max(j for j, s in enumerate(scenes) if s[0] <= t)
            clock = format_clock(t) if burn_timestamp else None
            key = (k, clock)
            if key not in cache:
                cache.clear()  # only the current (scene, second) is ever reused
                cache[key] = _to_yuv(_render(size, scenes[k][2], labels[k], clock))
            frame = av.VideoFrame.from_ndarray(cache[key], format="yuv420p")
            frame.pts = i
            frame.time_base = stream.codec_context.time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = buf.getvalue()
    target = Path(path) if path is not None else None
    if target is not None:
        target.write_bytes(data)
    return SyntheticVideo(
        data=data, path=target, duration=n / float(rate), fps=float(rate), size=size, codec=codec,
        container=container, scene_starts=[float(s[0]) for s in scenes], scene_labels=labels,
        scene_colors=[tuple(s[2]) for s in scenes],
    )


def make_long_video(path: str | os.PathLike[str] | None = None, *, hours: float = 10) -> SyntheticVideo:
    """A ``hours``-long clip at one frame per 10 minutes: real duration metadata, generated in well under 1 s."""
    return make_video(path, seconds=hours * 3600, fps=1 / 600, size=(160, 120), scenes=[(0.0, "long", (90, 90, 90))])


def make_8k_video(path: str | os.PathLike[str] | None = None) -> SyntheticVideo:
    """Two 7680x4320 frames (33 MP), to exercise the resolution limit."""
    return make_video(path, seconds=2, fps=1, size=(7680, 4320), scenes=[(0.0, "8k", (20, 20, 20))],
                      burn_timestamp=False)


def _audio_only(path: Path, seconds: float = 1.0, rate: int = 16000) -> None:
    with av.open(str(path), mode="w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate)
        stream.layout = "mono"
        t = np.arange(int(seconds * rate)) / rate
        samples = (np.sin(2 * np.pi * 440 * t) * 12000).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = 0
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _empty_video(path: Path, fmt: str) -> None:
    """A header declaring an H.264 stream and no frames. Matroska keeps the track (the demuxer then hits EOF
    while probing); mp4 drops a track without samples, leaving a container with no streams at all."""
    with av.open(str(path), mode="w", format=fmt) as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()


def make_bad_videos(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """One file per failure: ``corrupt`` (random bytes named .mp4), ``truncated`` (an mkv cut at 50%: its first
    half still decodes), ``no_video_stream`` (a WAV sine), ``empty`` (mkv with a video stream and zero frames),
    ``empty_mp4`` (mp4 written with a video stream and zero frames),
    ``too_long`` (10 h), ``resolution_too_large`` (8K)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = {name: d / f"{name}{ext}" for name, ext in [
        ("corrupt", ".mp4"), ("truncated", ".mkv"), ("no_video_stream", ".wav"), ("empty", ".mkv"),
        ("empty_mp4", ".mp4"),
        ("too_long", ".mp4"), ("resolution_too_large", ".mp4")]}
    files["corrupt"].write_bytes(random.Random(1234).randbytes(64 * 1024))
    whole = make_video(None, seconds=10, fps=10, container="mkv", gop=10).data
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    _audio_only(files["no_video_stream"])
    _empty_video(files["empty"], "matroska")
    _empty_video(files["empty_mp4"], "mp4")
    make_long_video(files["too_long"])
    make_8k_video(files["resolution_too_large"])
    return files


# --- edited footage: textured moving shots joined by cuts, fades, dissolves, flashes and pans -------------------

class EditedVideo(BaseModel):
    """An encoded clip of textured shots and the ground truth of its edit: ``boundaries`` are ``(kind, t)`` of
    every shot start (``t`` = first frame of the new shot; for fades/dissolves, the end of the transition) and
    ``non_boundaries`` are ``(kind, start, end)`` of changes that are no shot boundary (flash, pan, fade out)."""

    data: bytes
    duration: float
    fps: float
    boundaries: list[tuple[str, float]]
    non_boundaries: list[tuple[str, float, float]]


def _shot_canvas(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth random colour field twice the frame's width (room to pan), each shot its own palette."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, size=3)
    coarse = np.clip(base + rng.normal(0, 70, size=(8, 16, 3)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((2 * w, h), Image.BICUBIC), dtype=np.float32)


def make_edited_video(*, fps: float = 10, size: tuple[int, int] = (160, 96), seed: int = 7,
                      gop: int | None = None) -> EditedVideo:
    """24 s: fade in from black (0-1.5 s) on shot A, cut to B at 5.0, a 0.3 s white flash at 7.0, dissolve B->C
    (9.0-10.5), a fast pan over C (12.0-14.5), cut to D at 15.0, fade out to black (18.0-19.5), cut from black
    to E at 20.0. Every shot drifts slowly and carries sensor-like noise, so no two frames are identical."""
    w, h = size
    canvases = [_shot_canvas(seed * 10 + k, size) for k in range(5)]
    rng = np.random.default_rng(seed)

    def shot(k: int, t: float, pan: float = 0.0) -> np.ndarray:
        x = int(t * 4 + pan) % w  # slow drift of 4 px/s plus any pan offset
        return canvases[k][:, x:x + w]

    def pan_offset(t: float) -> float:
        return 0.0 if t < 12.0 else (min(t, 14.5) - 12.0) * 60.0  # 60 px/s

    def render(t: float) -> np.ndarray:
        if t < 1.5:
            img = shot(0, t) * (t / 1.5)
        elif t < 5.0:
            img = shot(0, t)
        elif t < 9.0:
            img = shot(1, t)
            if 7.0 <= t < 7.3:
                img = np.full_like(img, 250.0)
        elif t < 10.5:
            a = (t - 9.0) / 1.5
            img = (1 - a) * shot(1, t) + a * shot(2, t)
        elif t < 15.0:
            img = shot(2, t, pan_offset(t))
        elif t < 18.0:
            img = shot(3, t)
        elif t < 19.5:
            img = shot(3, t) * (1 - (t - 18.0) / 1.5)
        elif t < 20.0:
            img = np.zeros((h, w, 3), np.float32)
        else:
            img = shot(4, t)
        noise = rng.normal(0, 3, size=img.shape) if img.max() > 0 else 0
        return np.clip(img + noise, 0, 255).astype(np.uint8)

    data = encode_frames(render, seconds=24.0, fps=fps, size=size, gop=gop)
    return EditedVideo(
        data=data, duration=24.0, fps=fps,
        boundaries=[("fade_in", 1.5), ("cut", 5.0), ("dissolve", 10.5), ("cut", 15.0), ("cut", 20.0)],
        non_boundaries=[("flash", 7.0, 7.3), ("motion", 12.0, 14.5), ("fade_out", 18.0, 19.5)])


def encode_frames(render: Callable[[float], np.ndarray], *, seconds: float, fps: float, size: tuple[int, int],
                  gop: int | None = None, container: str = "mp4") -> bytes:
    """Encode ``render(t)`` (an RGB uint8 array of ``size``) at ``fps`` with libx264 ``ultrafast``."""
    rate = Fraction(fps).limit_denominator(10_000)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=_FORMATS[container]) as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = 1 / rate
        stream.codec_context.options = {"preset": "ultrafast", "tune": "zerolatency"}
        if gop is not None:
            stream.codec_context.gop_size = gop
        for i in range(max(0, math.ceil(seconds * fps - 1e-9))):
            frame = av.VideoFrame.from_ndarray(render(float(i / rate)), format="rgb24")
            frame.pts = i
            frame.time_base = stream.codec_context.time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
