"""Choosing which frames of a video the model sees, and the time notation used to talk about them.

The model sees a video only through a frame budget (each frame costs image tokens), so frames should land where
the content changes: :func:`scene_cuts` finds shot boundaries cheaply (tiny frames at ``probe_fps``, judged by
:mod:`pipelines.video.transitions`: a fade or dissolve is one boundary, a flash or a pan none), and
:func:`sample_frames` spends the budget on one frame just after each, filling the rest uniformly (past
``detect_max_s`` it only seeks). :func:`dense_times` plans a second, denser look at chosen segments. Times are
always seconds from the first frame; :func:`format_ts` / :func:`parse_ts` are the "mm:ss" notation shared with
prompts and answers.
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
from pipelines.video.transitions import Transition, detect_transitions, signature

__all__ = [
    "Cut",
    "TimeRange",
    "format_ts",
    "parse_ts",
    "dense_times",
    "fetch_frames",
    "sample_frames",
    "scene_changes",
    "scene_cuts",
    "uniform_times",
]

Strategy = Literal["uniform", "scenes", "hybrid"]
DEFAULT_DETECT_MAX_S = 1800.0  # scene detection decodes every frame: only up to 30 minutes of video


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
    """A detected shot boundary: ``t`` is the first probed frame of the new shot; ``score`` in [0, 1];
    ``kind`` is ``cut`` (hard), ``fade_in`` or ``dissolve`` (``t`` = the end of the gradual transition)."""

    t: float
    score: float
    kind: str = "cut"


def scene_cuts(
    source: Source,
    *,
    threshold: float = 0.3,
    probe_fps: float = 4.0,
    max_side: int = 160,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    stats: DecodeStats | None = None,
    transitions: list[Transition] | None = None,
) -> list[Cut]:
    """Shot boundaries with their scores, from tiny frames ``1/probe_fps`` apart judged by
    :func:`~pipelines.video.transitions.detect_transitions`: a fade or dissolve is one boundary at its end, a
    flash or camera motion none. Pass a list as ``transitions`` to get every judged run (for diagnostics).
    Streaming: a few 32x18 thumbnails in memory. Note it decodes the whole file (converting only the probed
    frames); :func:`sample_frames` skips it for videos longer than ``detect_max_s``."""
    frames = iter_frames(source, every_s=1.0 / probe_fps, max_side=max_side, max_seconds=max_seconds,
                         max_pixels=max_pixels, stats=stats)
    cuts: list[Cut] = []
    for tr in detect_transitions((signature(f) for f in frames), threshold=threshold):
        if transitions is not None:
            transitions.append(tr)
        if tr.is_boundary:
            cuts.append(Cut(t=tr.t, score=round(tr.score, 4), kind=tr.kind))
    return cuts


def scene_changes(
    source: Source, *, threshold: float = 0.3, probe_fps: float = 4.0, max_side: int = 160
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
    probe_fps: float = 4.0,
    threshold: float = 0.3,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    detect_max_s: float | None = DEFAULT_DETECT_MAX_S,
    stats: DecodeStats | None = None,
) -> list[Frame]:
    """At most ``budget`` frames sorted by time, deduplicated (a frame serving two planned times counts once),
    each with its timestamp. ``scenes``/``hybrid`` make one cheap detection pass first, then fetch the planned
    frames (seeking across long gaps). Scene detection decodes every frame, so a video longer than
    ``detect_max_s`` is sampled uniformly by seeking only: decoding work is then bounded by the budget times the
    keyframe interval, not by the duration. ``stats`` counts the fetch (not the detection)."""
    info = probe(source)
    cuts: list[Cut] = []
    if strategy != "uniform" and (detect_max_s is None or info.duration_s <= detect_max_s):
        cuts = scene_cuts(source, threshold=threshold, probe_fps=probe_fps, max_seconds=max_seconds,
                          max_pixels=max_pixels)
    elif strategy != "uniform":
        strategy = "uniform"
    times = plan_times(info.duration_s, cuts, budget, strategy=strategy)
    return fetch_frames(source, times, max_side=max_side, max_seconds=max_seconds, max_pixels=max_pixels,
                        stats=stats)[:budget]


def fetch_frames(
    source: Source,
    times: Sequence[float],
    *,
    max_side: int = 896,
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    stats: DecodeStats | None = None,
) -> list[Frame]:
    """The first frame at/after each of ``times`` (seeking across gaps), deduplicated, sorted by time."""
    frames: list[Frame] = []
    seen: set[int] = set()
    for frame in iter_frames(source, timestamps=times, max_side=max_side, max_seconds=max_seconds,
                             max_pixels=max_pixels, stats=stats):
        if frame.index not in seen:
            seen.add(frame.index)
            frames.append(frame)
    return frames


def dense_times(segments: Sequence[TimeRange], budget: int, *, fps: float | None = None, min_step: float = 1.0,
                exclude: Sequence[float] = ()) -> list[tuple[TimeRange, list[float], float]]:
    """Spread ``budget`` sample times over ``segments`` in proportion to their length (at least one each, never
    finer than the video's frame rate nor than ``min_step``: the model reads "mm:ss" labels, so
frames under a second apart would share a label), skipping times already in ``exclude`` (within a tenth of the spacing).
    Returns ``(segment, times, resolution_s)`` per segment; ``resolution_s`` is the spacing of its samples, the
    precision a time found in this pass can claim."""
    if budget <= 0 or not segments:
        return []
    total = sum(max(s.duration, 1e-3) for s in segments)
    counts = []
    for seg in segments:
        n = max(1, round(budget * max(seg.duration, 1e-3) / total))
        if fps:
            n = min(n, max(1, math.floor(seg.duration * fps) + 1))
        if min_step > 0:
            n = min(n, max(1, math.floor(seg.duration / min_step)))
        counts.append(n)
    while sum(counts) > budget and max(counts) > 1:  # rounding may overshoot: trim the most sampled
        counts[counts.index(max(counts))] -= 1
    out = []
    for seg, n in zip(segments, counts):
        step = seg.duration / n if seg.duration > 0 else 0.0
        times = [seg.start + (i + 0.5) * step for i in range(n)]
        times = [t for t in times if all(abs(t - e) > step / 10 for e in exclude)]
        out.append((seg, times, max(step, 1.0 / fps if fps else 0.0, min_step)))
    return out[:budget]
