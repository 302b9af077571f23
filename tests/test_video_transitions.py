"""Shot boundaries on generated edited footage (textured, drifting, noisy shots; no real film is available
offline): hard cuts are found, fades and dissolves are one boundary at their end, flashes, pans and fades out are
none. The previous per-pair detector reported 13 "cuts" on this clip, 3 of them inside the opening fade."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.video.decode import DecodeStats
from pipelines.video.sample import scene_cuts
from pipelines.video.synthetic import _shot_canvas, encode_frames, make_edited_video

PROBE_FPS = 4.0


@pytest.mark.parametrize(("fps", "seed"), [(10, 7), (25, 11)])
def test_cuts_fades_dissolves_flashes_and_pans_are_told_apart(fps: float, seed: int) -> None:
    clip = make_edited_video(fps=fps, seed=seed)
    judged: list = []
    cuts = scene_cuts(clip.data, probe_fps=PROBE_FPS, transitions=judged)
    assert [c.kind for c in cuts] == [kind for kind, _ in clip.boundaries], (cuts, judged)
    for cut, (_, t) in zip(cuts, clip.boundaries):  # the first probed frame of the new shot
        assert t - 1e-6 <= cut.t <= t + 1 / PROBE_FPS + 1 / fps, (cut, t)
    for kind, start, end in clip.non_boundaries:  # judged, and not taken for a shot start
        assert any(tr.kind == kind and start - 0.5 <= tr.start and tr.t <= end + 0.5 for tr in judged), (kind, judged)
        assert not any(start < c.t < end for c in cuts)


def test_an_opening_fade_from_black_is_one_boundary_not_four() -> None:
    clip = make_edited_video()
    early = [c for c in scene_cuts(clip.data) if c.t < 2.5]
    assert len(early) == 1 and early[0].kind == "fade_in"


def test_a_cut_inside_long_camera_motion_is_found_and_the_motion_is_not() -> None:
    size = (160, 96)
    a, b = _shot_canvas(1, size), _shot_canvas(2, size)
    rng = np.random.default_rng(0)

    def render(t: float) -> np.ndarray:  # a 30 s continuous pan (40 px/s), a hard cut at 17 s into another pan
        canvas = a if t < 17.0 else b
        x = int(t * 40) % size[0]
        return np.clip(canvas[:, x:x + size[0]] + rng.normal(0, 3, (size[1], size[0], 3)), 0, 255).astype(np.uint8)

    data = encode_frames(render, seconds=30, fps=10, size=size)
    stats = DecodeStats()
    judged: list = []
    cuts = scene_cuts(data, transitions=judged, stats=stats)
    assert [c.kind for c in cuts] == ["cut"] and 17.0 <= cuts[0].t <= 17.0 + 1 / PROBE_FPS + 0.1, (cuts, judged)
    assert any(tr.kind == "motion" for tr in judged)
    assert stats.kept <= 30 * PROBE_FPS + 1  # only the probed frames are converted


def test_the_detector_streams_in_bounded_memory_through_hours_of_motion() -> None:
    import tracemalloc

    from pipelines.video.transitions import Signature, detect_transitions

    rng = np.random.default_rng(0)
    base = rng.uniform(0, 255, (18, 64)).astype(np.float32)
    hist = np.full(96, 1 / 32, np.float32)

    def moving(n: int):  # a steady pan: every probe shifts the picture, none is a cut
        for i in range(n):
            yield Signature(t=i / 4, hist=hist, thumb=np.roll(base, i, axis=1)[:, :32].copy())

    tracemalloc.start()
    judged = list(detect_transitions(moving(2000)))  # 500 s of probes; the run is never buffered whole
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [t.kind for t in judged] == ["motion"] and peak < 1_000_000
