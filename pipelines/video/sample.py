"""Choosing which frames of a video the model sees, and the time notation used to talk about them.

The model sees a video only through a frame budget (each frame costs image tokens), so frames should land where
the content changes: :func:`scene_changes` finds cuts cheaply (tiny frames at ``probe_fps``, colour-histogram
and pixel distance), and :func:`sample_frames` spends the budget on one frame just after each cut, filling the
rest uniformly. Times are always seconds from the first frame; :func:`format_ts` / :func:`parse_ts` are the
"mm:ss" notation shared with prompts and answers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, model_validator

from pipelines.video.decode import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SECONDS,
    DecodeStats,
    Frame,
    Source,
    iter_frames,
    probe,
)

__all__ = [
    "Cut",
    "TimeRange",
    "format_ts",
    "parse_ts",
    "sample_frames",
    "scene_changes",
    "scene_cuts",
    "uniform_times",
]

Strategy = Literal["uniform", "scenes", "hybrid"]


def format_ts(seconds: float) -> str:
    """``"mm:ss"``, or ``"h:mm:ss"`` from one hour on (seconds are floored, like a player's clock)."""
    s = int(math.floor(max(0.0, seconds) + 1e-6))
    if s >= 3600:
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    return f"{s // 60:02d}:{s % 60:02d}"


_UNITS = re.compile(r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$")


def parse_ts(text: str | float | int) -> float:
    """Seconds from ``"mm:ss"``, ``"h:mm:ss"``, ``"65s"``, ``"1m5s"``, ``"1h2m"`` or plain seconds (``"65.5"``)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip().lower().replace(" ", "")
        if not raw:
            raise ValueError("empty timestamp")
        if ":" in raw:
            parts = raw.split(":")
            if len(parts) > 3 or not all(re.fullmatch(r"\d+(?:\.\d+)?", p) for p in parts):
                raise ValueError(f"bad timestamp {text!r}")
            value = 0.0
            for p in parts:
                value = value * 60 + float(p)
        elif re.fullmatch(r"\d+(?:\.\d+)?", raw):
            value = float(raw)
        else:
            m = _UNITS.match(raw)
            if not m or not any(m.groupdict().values()):
                raise ValueError(f"bad timestamp {text!r}")
            value = sum(float(m[k] or 0) * f for k, f in (("h", 3600), ("m", 60), ("s", 1)))
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"bad timestamp {text!r}")
    return value


class TimeRange(BaseModel):
    """A span of the video in seconds; accepts ``"mm:ss"`` strings too."""

    start: float
    end: float

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, data: object) -> object:
        if isinstance(data, dict):
            return {k: parse_ts(v) if k in ("start", "end") and isinstance(v, str) else v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> "TimeRange":
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"invalid range {self.start}..{self.end}")
        return self

    @property
    def duration(self) -> float:
        return self.end - self.start

    def contains(self, t: float) -> bool:
        return self.start <= t <= self.end

    def format(self) -> str:
        return f"{format_ts(self.start)}-{format_ts(self.end)}"


def uniform_times(duration_s: float, *, fps: float | None = None, budget: int | None = None) -> list[float]:
    """Centres of equal segments: ``ceil(duration * fps)`` of them (1 fps when neither is given), at most
    ``budget``. Centres rather than starts so no two samples sit on a segment boundary (often a cut)."""
    if duration_s <= 0:
        return [0.0] if (budget is None or budget > 0) else []
    if fps is not None:
        if fps <= 0:
            raise ValueError("fps must be positive")
        n = max(1, math.ceil(duration_s * fps - 1e-9))
    else:
        n = budget if budget is not None else max(1, math.ceil(duration_s))
    if budget is not None:
        n = min(n, budget)
    return [(i + 0.5) * duration_s / n for i in range(max(0, n))]


class Cut(BaseModel):
    """A detected scene change: ``t`` is the first probed frame of the new shot; ``score`` in [0, 1]."""

    t: float
    score: float


def _signature(frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.asarray(frame.image, dtype=np.uint8)
    hist = np.concatenate([np.bincount(rgb[..., c].ravel() >> 3, minlength=32) for c in range(3)]).astype(np.float32)
    hist /= max(1.0, hist.sum() / 3)
    small = np.asarray(frame.image.convert("L").resize((32, 18)), dtype=np.float32)
    return hist, small


def scene_cuts(
    source: Source,
    *,
    threshold: float = 0.3,
    probe_fps: float = 2.0,
    max_side: int = 160,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    stats: DecodeStats | None = None,
) -> list[Cut]:
    """Cuts with their scores. Score = max(colour-histogram distance, mean abs luma difference of a 32x18
    thumbnail / 255 * 2), between consecutive frames ``1/probe_fps`` apart. Histograms ignore motion; the
    thumbnail term catches cuts between shots with similar palettes. Streaming: two tiny frames in memory.
    Note it decodes the whole file (every frame, converting only the probed ones)."""
    cuts: list[Cut] = []
    prev: tuple[np.ndarray, np.ndarray] | None = None
    for frame in iter_frames(source, every_s=1.0 / probe_fps, max_side=max_side, max_seconds=max_seconds,
                             max_pixels=max_pixels, stats=stats):
        sig = _signature(frame)
        if prev is not None:
            hist_d = float(np.abs(sig[0] - prev[0]).sum() / 6)  # 3 channels, L1 of normalised hists is <= 2
            pix_d = float(np.abs(sig[1] - prev[1]).mean() / 255 * 2)
            score = min(1.0, max(hist_d, pix_d))
            if score >= threshold:
                cuts.append(Cut(t=frame.t, score=score))
        prev = sig
    return cuts


def scene_changes(
    source: Source, *, threshold: float = 0.3, probe_fps: float = 2.0, max_side: int = 160
) -> list[float]:
    """Times (s) of detected cuts: the first probed frame after each, so within ``1/probe_fps`` after it."""
    return [c.t for c in scene_cuts(source, threshold=threshold, probe_fps=probe_fps, max_side=max_side)]


def _thin(times: Sequence[float], keep: int) -> list[float]:
    if keep <= 0:
        return []
    if len(times) <= keep:
        return list(times)
    idx = np.linspace(0, len(times) - 1, keep).round().astype(int)
    return [times[i] for i in sorted(set(idx.tolist()))]


def plan_times(
    duration_s: float, cuts: Sequence[Cut], budget: int, *, strategy: Strategy = "hybrid", after_cut_s: float = 0.0
) -> list[float]:
    """The sample times for a strategy, at most ``budget``, sorted. Hybrid: the start plus one time just after
    each cut (strongest cuts win when they do not all fit), the rest uniform, skipping uniform times closer
    than half a uniform step to a cut sample."""
    if budget <= 0:
        raise ValueError("budget must be positive")
    if strategy == "uniform":
        return uniform_times(duration_s, budget=budget)
    anchors = [0.0] + [min(c.t + after_cut_s, max(0.0, duration_s)) for c in cuts]
    if len(anchors) > budget:
        strongest = sorted(cuts, key=lambda c: -c.score)[: budget - 1]
        anchors = [0.0] + sorted(c.t + after_cut_s for c in strongest)
    if strategy == "scenes":
        return sorted(set(anchors))[:budget]
    chosen = sorted(set(anchors))
    free = budget - len(chosen)
    if free > 0:
        grid = uniform_times(duration_s, budget=budget)
        gap = duration_s / budget / 2
        extra = [t for t in grid if all(abs(t - a) >= gap for a in chosen)]
        chosen = sorted(chosen + _thin(extra, free))
    return chosen


def sample_frames(
    source: Source,
    *,
    budget: int,
    strategy: Strategy = "hybrid",
    max_side: int = 896,
    probe_fps: float = 2.0,
    threshold: float = 0.3,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> list[Frame]:
    """At most ``budget`` frames sorted by time, deduplicated (a frame serving two planned times counts once),
    each with its timestamp. ``scenes``/``hybrid`` make one cheap detection pass first, then fetch the planned
    frames (seeking across long gaps)."""
    info = probe(source)
    cuts: list[Cut] = []
    if strategy != "uniform":
        cuts = scene_cuts(source, threshold=threshold, probe_fps=probe_fps, max_seconds=max_seconds,
                          max_pixels=max_pixels)
    times = plan_times(info.duration_s, cuts, budget, strategy=strategy)
    frames: list[Frame] = []
    seen: set[int] = set()
    for frame in iter_frames(source, timestamps=times, max_side=max_side, max_seconds=max_seconds,
                             max_pixels=max_pixels):
        if frame.index not in seen:
            seen.add(frame.index)
            frames.append(frame)
    return frames[:budget]
