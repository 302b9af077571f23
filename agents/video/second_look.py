"""Where to look again: the segments a question points to after the coarse pass, and moments refined by the
dense pass with the resolution each can claim.

The coarse pass sees one frame every ``gap`` seconds, so a relevant observation at ``t`` means the event lies
somewhere in ``(t - gap, t + gap)``; the dense pass samples exactly those windows (plus those around the times
the coarse answer cited), and a moment found there is known to the dense pass's spacing instead of ``gap``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from agents.video.timeline import Moment, Observation, moments


class Segment(BaseModel):
    start: float
    end: float
    why: str  # "relevant" (an observation marked relevant) or "cited" (a time the coarse answer cited)

    @property
    def duration(self) -> float:
        return self.end - self.start


class RefinedMoment(BaseModel):
    start: float
    end: float
    descriptions: list[str]
    resolution_s: float  # each edge is within this of the frames that bound the event
    found_in: str  # "dense" or "coarse"


def pick_segments(timeline: Sequence[Observation], cited: Sequence[float], gap: float, duration: float,
                  limit: int) -> list[Segment]:
    """Segments around relevant observations and cited times, one coarse spacing on each side, merged where they
    overlap; at most ``limit`` (the ones covering the most relevant observations first), in time order."""
    raw: list[tuple[float, float, str, int]] = []
    for obs in timeline:
        if obs.relevant:
            raw.append((obs.start - gap, obs.end + gap, "relevant", 1))
    for t in cited:
        raw.append((t - gap, t + gap, "cited", 0))
    merged: list[list[Any]] = []
    for start, end, why, weight in sorted(raw):
        start, end = max(0.0, start), min(duration, end)
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            last = merged[-1]
            last[1] = max(last[1], end)
            last[3] += weight
            if why == "relevant":
                last[2] = "relevant"
        else:
            merged.append([start, end, why, weight])
    best = sorted(merged, key=lambda m: (-m[3], m[0]))[:limit]
    return [Segment(start=m[0], end=m[1], why=m[2]) for m in sorted(best)]


def edge_segments(timeline: Sequence[Observation], kind: str, resolution: float, duration: float, limit: int,
                  looked: Sequence[tuple[Segment, float]]) -> list[Segment]:
    """The next, narrower look: around both edges of each moment found (``moments``: an edge is known to
    ``resolution``), or around the relevant observations (``question``), one ``resolution`` on each side, inside
    what was just looked at."""
    if kind == "moments":
        found = moments([o for o in timeline if any(s.start - 1e-6 <= o.start <= s.end + 1e-6 for s, _ in looked)],
                        resolution + 1.0)
        raw = [t for m in found for t in (m.start, m.end)]
    else:
        raw = [t for o in timeline if o.relevant for t in (o.start, o.end)]
    spans = [Observation(start=t, end=t, description="", relevant=True, window=0) for t in sorted(set(raw))]
    return [s.model_copy(update={"why": "edge"}) for s in pick_segments(spans, [], resolution, duration, limit)]


def refine_moments(coarse: Sequence[Moment], both: Sequence[Observation], segments: Sequence[tuple[Segment, float]],
                   edges: Sequence[tuple[Segment, float]], coarse_gap: float) -> list[RefinedMoment]:
    """Each first-look segment's moments from the observations of every pass inside it (joined within the
    segment's spacing plus 1 s: the model reads times from whole-second "mm:ss" labels); a moment's resolution is
    that of the finest look around its coarser edge (``edges``: every look's segments). Where no look saw
    anything relevant, or outside every segment, the coarse moments stay, with the coarse resolution."""
    def finest(t: float, default: float) -> float:
        return min([r for s, r in edges if s.start - 1e-6 <= t <= s.end + 1e-6] + [default])

    out: list[RefinedMoment] = []
    covered: list[Segment] = []
    for seg, resolution in segments:
        inside = [o for o in both if seg.start - 1e-6 <= o.start <= seg.end + 1e-6]
        found = moments(inside, resolution + 1.0)
        if found:
            covered.append(seg)
            out += [RefinedMoment(start=m.start, end=m.end, descriptions=m.descriptions, found_in="dense",
                                  resolution_s=max(finest(m.start, resolution), finest(m.end, resolution)))
                    for m in found]
    for m in coarse:
        if not any(seg.start <= m.start <= seg.end or seg.start <= m.end <= seg.end for seg in covered):
            out.append(RefinedMoment(start=m.start, end=m.end, descriptions=m.descriptions,
                                     resolution_s=coarse_gap, found_in="coarse"))
    return sorted(out, key=lambda m: m.start)
