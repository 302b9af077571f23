"""Per-window observations -> one timeline; relevant observations -> time ranges; answer citations checked
against the timeline (a cited time no observation covers is marked unsupported)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Observation(BaseModel):
    start: float
    end: float
    description: str
    relevant: bool | None = None
    event: Any = None
    window: int
    adjusted: bool = False  # the model's times fell outside its window's frames and were clamped


class Moment(BaseModel):
    start: float
    end: float
    descriptions: list[str] = Field(default_factory=list)


class AnswerCitation(BaseModel):
    time: float
    claim: str
    supported: bool  # the time falls within (or next to) an observation of the timeline


def window_observations(raw: list[dict[str, Any]], window: int, span: tuple[float, float],
                        parse_ts: Any) -> list[Observation]:
    """Parse and clamp one window's observations to the times of the frames it saw."""
    lo, hi = span
    out = []
    for item in raw:
        try:
            start, end = parse_ts(item["start"]), parse_ts(item["end"])
        except (KeyError, ValueError, TypeError):
            continue
        if end < start:
            start, end = end, start
        clamped_start, clamped_end = min(max(start, lo), hi), min(max(end, lo), hi)
        out.append(Observation(start=clamped_start, end=clamped_end, description=str(item.get("description", "")),
                               relevant=item.get("relevant"), event=item.get("event"), window=window,
                               adjusted=(clamped_start, clamped_end) != (start, end)))
    return out


def merge_timeline(observations: list[Observation]) -> list[Observation]:
    """Sorted by time; the same description over overlapping ranges (overlapping windows see the same frames)
    becomes one entry spanning both."""
    merged: list[Observation] = []
    for obs in sorted(observations, key=lambda o: (o.start, o.end)):
        key = " ".join(obs.description.split()).casefold()
        twin = next((m for m in reversed(merged[-8:]) if " ".join(m.description.split()).casefold() == key
                     and m.start <= obs.end and obs.start <= m.end + 1e-6), None)
        if twin is not None:
            twin.start, twin.end = min(twin.start, obs.start), max(twin.end, obs.end)
        else:
            merged.append(obs.model_copy())
    return merged


def moments(timeline: list[Observation], gap_s: float) -> list[Moment]:
    """Relevant observations joined into ranges: two are joined when nothing irrelevant was seen between them
    and they are at most ``gap_s`` apart (pass the largest spacing of the sampled frames)."""
    out: list[Moment] = []
    last_irrelevant = float("-inf")
    for obs in timeline:
        if not obs.relevant:
            last_irrelevant = max(last_irrelevant, obs.start)
            continue
        if out and obs.start <= out[-1].end + gap_s and last_irrelevant <= out[-1].end:
            out[-1].end = max(out[-1].end, obs.end)
            out[-1].descriptions.append(obs.description)
        else:
            out.append(Moment(start=obs.start, end=obs.end, descriptions=[obs.description]))
    return out


def check_citations(raw: list[dict[str, Any]], timeline: list[Observation], duration: float, gap_s: float,
                    parse_ts: Any) -> list[AnswerCitation]:
    out = []
    for item in raw:
        try:
            t = parse_ts(item["time"])
        except (KeyError, ValueError, TypeError):
            continue
        supported = 0 <= t <= duration + gap_s and any(o.start - gap_s <= t <= o.end + gap_s for o in timeline)
        out.append(AnswerCitation(time=t, claim=str(item.get("claim", "")), supported=supported))
    return out


def timeline_text(timeline: list[Observation], format_ts: Any) -> str:
    return "\n".join(f"[{format_ts(o.start)}-{format_ts(o.end)}] {o.description}" for o in timeline)
