"""Shot boundaries that tell hard cuts from fades, dissolves, flashes and camera motion, in one cheap stream.

A per-pair distance alone takes every big change for a cut: a film opening with a fade from black "cuts" at each
probe of the fade, a photographer's flash cuts twice, a fast pan cuts all the time. So changes are grouped into
*runs* of consecutive probes that differ by more than an adaptive floor (``low_ratio`` x the typical distance
of quiet steps, PySceneDetect-style, and at least ``min_low``), and each run is judged when it ends:

* **flash**: the last frame is back where the first was (``dist(before, after) < threshold / 2``), or a cut
  away is followed within ``flash_max_s`` by a cut back to the same picture: no boundary.
* **cut**: one step of the run, at least ``threshold`` or ``quiet_jump`` x the typical quiet step (adaptive,
  for shots with similar palettes): the new shot starts at the probe after it.
* **fade_in / fade_out / dissolve**: every frame inside the run is a blend ``(1-a)*before + a*after`` of the
  frames around it (small residual) and the run changed the picture by at least ``threshold / 2``, with ``before`` (fade in) or ``after`` (fade out) near black. One boundary,
  at the end of the transition (the first clean frame of the new shot).
* **motion**: anything else (a pan, a zoom, people moving): no boundary, unless one step dwarfs the others
  (``cut_dominance``), which is a cut inside motion. A run longer than ``max_transition_s`` is motion by definition
  and is not buffered further, so memory stays at a few 32x18 thumbnails whatever the video's length.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipelines.video.decode import Frame

__all__ = ["Signature", "Transition", "TransitionKind", "detect_transitions", "signature"]

TransitionKind = Literal["cut", "fade_in", "fade_out", "dissolve", "flash", "motion"]
BLACK_LUMA = 24.0  # mean luma (0-255) under which a frame counts as black


@dataclass(frozen=True)
class Signature:
    """What the detector keeps of a probed frame: a 96-bin colour histogram and a 32x18 luma thumbnail."""

    t: float
    hist: np.ndarray
    thumb: np.ndarray

    @property
    def luma(self) -> float:
        return float(self.thumb.mean())


@dataclass(frozen=True)
class Transition:
    """A judged run of change: ``start`` (last frame before it) .. ``t`` (first frame after it)."""

    kind: TransitionKind
    start: float
    t: float
    score: float

    @property
    def is_boundary(self) -> bool:
        """Whether a new shot starts at ``t`` (flashes and camera motion are not shot boundaries; a fade out
        ends on black, and the fade in or cut that follows is the boundary)."""
        return self.kind in ("cut", "fade_in", "dissolve")


def signature(frame: Frame) -> Signature:
    rgb = np.asarray(frame.image, dtype=np.uint8)
    hist = np.concatenate([np.bincount(rgb[..., c].ravel() >> 3, minlength=32) for c in range(3)]).astype(np.float32)
    hist /= max(1.0, hist.sum() / 3)
    thumb = np.asarray(frame.image.convert("L").resize((32, 18)), dtype=np.float32)
    return Signature(t=frame.t, hist=hist, thumb=thumb)


def distance(a: Signature, b: Signature) -> float:
    """max(colour-histogram L1 / 6, mean abs luma difference of the thumbnails / 255 * 2), in [0, 1]."""
    hist_d = float(np.abs(a.hist - b.hist).sum() / 6)
    pix_d = float(np.abs(a.thumb - b.thumb).mean() / 255 * 2)
    return min(1.0, max(hist_d, pix_d))


def blend_residual(before: Signature, inner: list[Signature], after: Signature) -> float:
    """How far the inner frames are from the best blend of ``before`` and ``after`` (0 = a perfect
    fade/dissolve), relative to how different ``before`` and ``after`` are."""
    p, q = before.thumb.ravel(), after.thumb.ravel()
    span = q - p
    norm = float(span @ span)
    if norm < 1e-6:
        return 1.0
    worst = 0.0
    for x in inner:
        v = x.thumb.ravel()
        a = float(np.clip((v - p) @ span / norm, 0.0, 1.0))
        worst = max(worst, float(np.abs(v - (p + a * span)).mean()))
    return worst / max(1e-6, float(np.abs(span).mean()))


def detect_transitions(
    signatures: Iterable[Signature],
    *,
    threshold: float = 0.3,
    min_low: float = 0.04,
    low_ratio: float = 3.0,
    max_transition_s: float = 3.0,
    blend_tolerance: float = 0.25,
    cut_dominance: float = 3.0,
    quiet_jump: float = 8.0,
    flash_max_s: float = 0.6,
) -> Iterator[Transition]:
    """Judge a stream of signatures (time order); yields every run (``is_boundary`` says which start shots)."""
    prev: Signature | None = None
    quiet = 0.0  # running mean of quiet steps' distances: the adaptive floor's base
    quiet_n = 0
    run: list[Signature] = []  # [frame before the run, frames inside ..., last frame so far]
    steps: list[float] = []
    motion = False

    def judge() -> Transition:
        before, after = run[0], run[-1]
        total = distance(before, after)
        big = max(steps)
        if motion:
            return Transition("motion", before.t, after.t, big)
        if total < threshold / 2:
            return Transition("flash" if big >= threshold else "motion", before.t, after.t, big)
        if len(steps) == 1:
            sharp = total >= threshold or total >= quiet_jump * (quiet / quiet_n if quiet_n else 0.0)
            return Transition("cut" if sharp else "motion", before.t, after.t, total)
        if blend_residual(before, run[1:-1], after) <= blend_tolerance:
            kind: TransitionKind = ("fade_in" if before.luma < BLACK_LUMA else
                                    "fade_out" if after.luma < BLACK_LUMA else "dissolve")
            return Transition(kind, before.t, after.t, total)
        ordered = sorted(steps)
        if big >= threshold and big >= cut_dominance * ordered[-2]:
            k = steps.index(big)
            return Transition("cut", run[k].t, run[k + 1].t, big)
        return Transition("motion", before.t, after.t, big)

    pending: list[tuple[Transition, Signature]] = []  # recent cuts, with the frame before each

    def settle(verdict: Transition, before: Signature, after: Signature) -> Iterator[Transition]:
        """Hold cuts for ``flash_max_s``: a cut away and a cut back to (nearly) the same picture is a flash."""
        nonlocal pending
        if verdict.kind == "cut":
            back = next((p for p in pending if verdict.t - p[0].t <= flash_max_s
                         and distance(p[1], after) < threshold / 2), None)
            if back is not None:
                pending = [p for p in pending if p[0].t < back[0].t]
                yield from (p[0] for p in pending)
                pending = []
                yield Transition("flash", back[0].start, verdict.t, max(back[0].score, verdict.score))
                return
            pending.append((verdict, before))
            return
        yield from (p[0] for p in pending)
        pending = []
        yield verdict

    def release(now: float) -> Iterator[Transition]:
        nonlocal pending
        # a cut back is judged one probe after its run ends: keep cuts while a short run is still open
        while pending and ((not run and now - pending[0][0].t > flash_max_s) or motion):
            yield pending.pop(0)[0]

    for sig in signatures:
        if prev is None:
            prev = sig
            continue
        yield from release(sig.t)
        d = distance(prev, sig)
        floor = max(min_low, low_ratio * (quiet / quiet_n if quiet_n else 0.0))
        if d < floor:
            if run:
                yield from settle(judge(), run[0], run[-1])
                run, steps, motion = [], [], False
            quiet += d
            quiet_n += 1
            if quiet_n > 64:  # a running mean over roughly the last 64 quiet steps
                quiet *= 64 / quiet_n
                quiet_n = 64
        else:
            if motion:
                # inside long motion only a step that dwarfs the recent ones is a cut
                if d >= threshold and d >= cut_dominance * (sum(steps) / len(steps)):
                    yield Transition("cut", prev.t, sig.t, d)
                steps = (steps + [d])[-8:]
                run = [run[0], sig]
            else:
                if not run:
                    run = [prev]
                run.append(sig)
                steps.append(d)
                if sig.t - run[0].t > max_transition_s:
                    motion = True
                    yield from _cuts_in(run, steps, threshold, cut_dominance)
                    run, steps = [run[0], sig], steps[-8:]
        prev = sig
    if run:
        yield from settle(judge(), run[0], run[-1])
    yield from (p[0] for p in pending)


def _cuts_in(run: list[Signature], steps: list[float], threshold: float, dominance: float) -> Iterator[Transition]:
    """A run that turned out to be motion may still hold a cut: a step that dwarfs the run's median step."""
    median = float(np.median(steps))
    for k, d in enumerate(steps):
        if d >= threshold and d >= dominance * median:
            yield Transition("cut", run[k].t, run[k + 1].t, d)
