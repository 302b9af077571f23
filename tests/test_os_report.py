"""The run report: every step kind and status renders, markers land where the action acted, nothing unescaped."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image

from agents.os_agent.report import STATUS_COLOURS, annotate_step, render_report
from agents.os_agent.trajectory import StepRecord

W, H = 400, 300
WHITE = (255, 255, 255)
ACTIONS = [
    {"kind": "click", "x": 100, "y": 80},
    {"kind": "double_click", "x": 390, "y": 290},
    {"kind": "right_click", "x": 0, "y": 0},
    {"kind": "move", "x": 200, "y": 150},
    {"kind": "drag", "x": 50, "y": 50, "to_x": 300, "to_y": 200},
    {"kind": "scroll", "x": 200, "y": 150, "clicks": -5},
    {"kind": "scroll", "x": 200, "y": 150, "clicks": 3, "horizontal": True},
    {"kind": "type", "text": "hello world"},
    {"kind": "key", "keys": ["ctrl", "s"]},
    {"kind": "wait", "seconds": 2.0},
    {"kind": "done", "answer": "42"},
    {"kind": "fail", "reason": "no such file"},
]


def _png(size: tuple[int, int] = (W, H), colour: tuple[int, int, int] = WHITE) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def _pixels(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def _changed(image: Image.Image, *points: tuple[float, float]) -> list[bool]:
    return [image.getpixel((int(x), int(y))) != WHITE for x, y in points]


def test_click_marker_is_drawn_at_the_click_point_only() -> None:
    out = _pixels(annotate_step(_png(), {"kind": "click", "x": 100, "y": 80}))
    assert out.size == (W, H)
    assert _changed(out, (100, 80)) == [True]
    assert _changed(out, (10, 290), (390, 10), (300, 250)) == [False, False, False]  # far from the marker: untouched


@pytest.mark.parametrize("kind", ["double_click", "right_click", "move"])
def test_other_pointer_markers(kind: str) -> None:
    out = _pixels(annotate_step(_png(), {"kind": kind, "x": 250, "y": 60}))
    ring = [(250 + dx, 60 + dy) for dx, dy in ((7, 0), (-7, 0), (0, 7), (0, -7))]  # radius of the marker ~6.7
    assert any(_changed(out, *ring))
    assert _changed(out, (30, 270)) == [False]


def test_marker_maps_screen_pixels_onto_a_smaller_screenshot() -> None:
    out = _pixels(annotate_step(_png(), {"kind": "click", "x": 200, "y": 160}, screen_size=(800, 600)))
    assert _changed(out, (100, 80)) == [True]
    assert _changed(out, (200, 160)) == [False]


def test_drag_draws_start_end_and_the_path_between() -> None:
    out = _pixels(annotate_step(_png(), {"kind": "drag", "x": 50, "y": 50, "to_x": 300, "to_y": 200}))
    # the start marker is hollow: its ring, the end's centre and the line's midpoint are drawn
    assert _changed(out, (50, 50 - 6), (300, 200), (175, 125)) == [True, True, True]
    assert _changed(out, (300, 50), (50, 250)) == [False, False]  # off the path


def test_scroll_arrow_points_the_scroll_direction() -> None:
    down = _pixels(annotate_step(_png(), {"kind": "scroll", "x": 200, "y": 100, "clicks": -5}))
    assert _changed(down, (200, 100), (200, 100 + 22)) == [True, True]
    assert _changed(down, (200, 100 - 22)) == [False]
    up = _pixels(annotate_step(_png(), {"kind": "scroll", "x": 200, "y": 100, "clicks": 5}))
    assert _changed(up, (200, 100 - 22)) == [True]
    right = _pixels(annotate_step(_png(), {"kind": "scroll", "x": 200, "y": 100, "clicks": 2, "horizontal": True}))
    assert _changed(right, (200 + 22, 100), (200 - 22, 100)) == [True, False]


@pytest.mark.parametrize("action", [{"kind": "type", "text": "hello"}, {"kind": "key", "keys": ["ctrl", "s"]},
                                    {"kind": "done", "answer": ""}])
def test_keyboard_and_terminal_actions_get_a_caption_box(action: dict) -> None:
    out = _pixels(annotate_step(_png(), action))
    assert _changed(out, (W // 2, H - 2), (W - 3, H - 4)) == [True, True]
    assert _changed(out, (W // 2, 20)) == [False]


def test_no_action_leaves_the_screenshot_alone_and_max_width_downscales() -> None:
    assert _pixels(annotate_step(_png(), None)).tobytes() == _pixels(_png()).tobytes()
    assert _pixels(annotate_step(_png((1920, 1080)), ACTIONS[0], max_width=960)).size == (960, 540)


def _steps() -> list[StepRecord]:
    statuses = list(STATUS_COLOURS)
    return [StepRecord(index=i, screenshot=f"ref{i % 3}", screen_width=W, screen_height=H, model_output=f"out {i}",
                       action=action, status=statuses[i % len(statuses)], timings={"model": 0.5, "execute": 0.25})
            for i, action in enumerate(ACTIONS)]


def test_report_renders_every_kind_and_status_self_contained() -> None:
    steps = _steps()
    shots = {"ref0": _png(), "ref1": _png((1280, 720), (30, 30, 30)), "ref2": _png()}
    page = render_report(goal="Save the file", steps=steps, screenshots=shots, outcome="succeeded", answer="42")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert page.count('<section class="step"') == len(ACTIONS)
    images = re.findall(r'<img src="data:image/(?:png|jpeg);base64,([^"]+)" width="(\d+)"', page)
    assert len(images) == len(ACTIONS)
    for data, width in images:
        assert Image.open(io.BytesIO(base64.b64decode(data))).width == int(width) <= 960
    for status, colour in STATUS_COLOURS.items():
        assert f'background:{colour}">{status}</span>' in page
    for text in ("click (100,80)", "drag (50,50) -&gt; (300,200)", "scroll -5 at (200,150)",
                 "scroll +3 horizontal", "type &#x27;hello world&#x27;", "key ctrl+s", "wait 2s",
                 "done &#x27;42&#x27;", "fail &#x27;no such file&#x27;"):
        assert text in page, text
    assert f"{len(ACTIONS)} (" in page and "9.0 s" in page  # step count, total time = 12 x 0.75 s
    assert "Save the file" in page and "succeeded" in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page) and "<script" not in page.lower()


def test_everything_from_the_model_and_the_desktop_is_escaped() -> None:
    payload = "<script>alert('x')</script>"
    step = StepRecord(index=0, screenshot="ref", screen_width=W, screen_height=H, window_title=payload,
                      model_output=f"## Thought: {payload}", action={"kind": "type", "text": payload},
                      status="executed", detail=payload)
    bad_action = StepRecord(index=1, model_output="x", action={"kind": payload, "x": 1}, status="rejected")
    page = render_report(goal=payload, steps=[step, bad_action], screenshots={"ref": _png()}, outcome=payload,
                         answer=payload, title=payload)
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;") >= 8  # title x2, goal, outcome, answer, window, detail, output, actions


def test_missing_or_broken_screenshots_render_placeholders() -> None:
    steps = [StepRecord(index=0, screenshot="gone", action=ACTIONS[0], status="executed"),
             StepRecord(index=1, screenshot=None, status="malformed", model_output="???"),
             StepRecord(index=2, screenshot="junk", action=ACTIONS[0], status="error")]
    page = render_report(goal="g", steps=steps, screenshots={"junk": b"not a png"}, outcome="failed")
    assert "<img" not in page
    assert "screenshot gone not available" in page and "no screenshot recorded" in page
    assert "could not be decoded" in page
    assert "no action" in page  # the malformed step
    empty = render_report(goal="g", steps=[], screenshots={}, outcome="cancelled")
    assert "no steps" in empty and "0 (-)" in empty
