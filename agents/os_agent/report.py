"""A self-contained HTML report of one OS-agent run, for a human to see what the agent saw and did.

One file, no external resources (screenshots are embedded as data URIs, the CSS is inline, no scripts), so it can be
mailed or attached to a ticket. Each step's screenshot gets the action drawn on it (a copy: the stored blob is never
changed). Everything that came from the model or the desktop - model output, window titles, the goal, the answer,
details - is untrusted and HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import textwrap
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from pydantic import TypeAdapter, ValidationError

from agents.os_agent.trajectory import StepRecord
from connectors.desktop.actions import ScreenAction, describe

MAX_WIDTH = 960
MARK = (255, 0, 170)       # the action's colour: magenta is rare on desktops
START = (0, 190, 120)      # a drag's start
HALO = (255, 255, 255)
CAPTION_BG = (20, 20, 28)
STATUS_COLOURS = {"executed": "#1a7f37", "terminal": "#0969da", "malformed": "#bc4c00", "off_screen": "#9a6700",
                  "blocked": "#cf222e", "rejected": "#8250df", "error": "#82071e"}
_ACTION = TypeAdapter(ScreenAction)


# --------------------------------------------------------------------------------------------------- drawing
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, p: tuple[float, float], offset: float, text: str, font, size: tuple[int, int],
           colour: tuple[int, int, int] = MARK) -> None:
    """A small filled tag below-right of point ``p``, flipped to the other side near an edge so it never covers
    the marker, and kept inside the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 8, bottom - top + 6
    x = p[0] + offset if p[0] + offset + w <= size[0] else p[0] - offset - w
    y = p[1] + offset if p[1] + offset + h <= size[1] else p[1] - offset - h
    x = min(max(x, 0), max(size[0] - w, 0))
    y = min(max(y, 0), max(size[1] - h, 0))
    draw.rectangle((x, y, x + w, y + h), fill=colour)
    draw.text((x + 4 - left, y + 3 - top), text, font=font, fill=(255, 255, 255))


def _target(draw: ImageDraw.ImageDraw, p: tuple[float, float], r: float, colour=MARK,
            filled_centre: bool = True) -> None:
    """Circle + crosshair centred on ``p``, with a white halo so it shows on dark and light screens."""
    x, y = p
    for width, col in ((5, HALO), (3, colour)):
        draw.ellipse((x - r, y - r, x + r, y + r), outline=col, width=width)
        for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            draw.line((x + dx * r * 0.35, y + dy * r * 0.35, x + dx * r * 1.6, y + dy * r * 1.6), fill=col,
                      width=width)
    if filled_centre:
        c = max(2.0, r * 0.22)
        draw.ellipse((x - c, y - c, x + c, y + c), fill=colour, outline=HALO)


def _arrow(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], width: int, head: float,
           colour=MARK) -> None:
    angle = math.atan2(b[1] - a[1], b[0] - a[0])
    base = (b[0] - head * math.cos(angle), b[1] - head * math.sin(angle))  # the shaft stops under the head
    draw.line((a, base), fill=HALO, width=width + 3)
    draw.line((a, base), fill=colour, width=width)
    wing = head * 0.55
    left = (base[0] + wing * math.cos(angle + math.pi / 2), base[1] + wing * math.sin(angle + math.pi / 2))
    right = (base[0] + wing * math.cos(angle - math.pi / 2), base[1] + wing * math.sin(angle - math.pi / 2))
    draw.polygon([b, left, right], fill=colour, outline=HALO)


def _caption(draw: ImageDraw.ImageDraw, text: str, font, size: tuple[int, int], font_px: int) -> None:
    """A box along the bottom edge for actions without a point (type, key, wait, done, fail)."""
    chars = max(20, int(size[0] / (font_px * 0.6)) - 4)
    lines = textwrap.wrap(text, chars, max_lines=3, placeholder=" ...", replace_whitespace=True) or [text]
    line_h = font_px + 6
    top = size[1] - line_h * len(lines) - 10
    draw.rectangle((0, top, size[0], size[1]), fill=CAPTION_BG)
    draw.rectangle((0, top, 6, size[1]), fill=MARK)
    for i, line in enumerate(lines):
        draw.text((14, top + 5 + i * line_h), line, font=font, fill=(255, 255, 255))


def _caption_text(action: dict[str, Any]) -> str:
    kind = action.get("kind")
    if kind == "type":
        return f'type "{action.get("text", "")}"'
    if kind == "key":
        return "key " + "+".join(str(k) for k in action.get("keys") or [])
    if kind == "wait":
        return f"wait {action.get('seconds', '')}s"
    if kind == "done":
        return f"done: {action.get('answer', '')}" if action.get("answer") else "done"
    if kind == "fail":
        return f"fail: {action.get('reason', '')}"
    return str(kind)


def _draw(image: Image.Image, action: Mapping[str, Any], scale: tuple[float, float]) -> None:
    w, h = image.size
    draw = ImageDraw.Draw(image)
    unit = max(6.0, min(w, h) / 45)
    font_px = max(11, round(unit * 1.1))
    font = _font(font_px)
    kind = action.get("kind")

    def pt(kx: str, ky: str) -> tuple[float, float] | None:
        x, y = action.get(kx), action.get(ky)
        if not isinstance(x, int | float) or not isinstance(y, int | float):
            return None
        return x * scale[0], y * scale[1]

    if kind in ("click", "double_click", "right_click", "move"):
        p = pt("x", "y")
        if p is None:
            return
        _target(draw, p, unit, filled_centre=kind != "move")
        if kind == "double_click":
            draw.ellipse((p[0] - unit * 1.35, p[1] - unit * 1.35, p[0] + unit * 1.35, p[1] + unit * 1.35),
                         outline=MARK, width=2)
        tag = {"click": "click", "double_click": "double click", "right_click": "right click", "move": "move"}[kind]
        _label(draw, p, unit * 1.2, f"{tag} ({action['x']},{action['y']})", font, (w, h))
    elif kind == "drag":
        a, b = pt("x", "y"), pt("to_x", "to_y")
        if a is None or b is None:
            return
        if math.dist(a, b) > unit:
            _arrow(draw, a, b, width=max(3, round(unit / 3)), head=unit * 1.4)
        _target(draw, a, unit * 0.8, colour=START, filled_centre=False)
        _target(draw, b, unit * 0.8)
        _label(draw, a, unit, f"drag start ({action['x']},{action['y']})", font, (w, h), START)
        _label(draw, b, unit, f"end ({action['to_x']},{action['to_y']})", font, (w, h))
    elif kind == "scroll":
        p = pt("x", "y")
        if p is None:
            return
        clicks = int(action.get("clicks") or 0)
        horizontal = bool(action.get("horizontal"))
        sign = 1 if clicks > 0 else -1
        # pyautogui: > 0 scrolls up (vertical) / right (horizontal)
        direction = (sign, 0) if horizontal else (0, -sign)
        length = unit * 4
        _target(draw, p, unit * 0.8)
        _arrow(draw, (p[0] + direction[0] * unit, p[1] + direction[1] * unit),
               (p[0] + direction[0] * length, p[1] + direction[1] * length), width=max(3, round(unit / 3)),
               head=unit * 1.3)
        way = ("right" if sign > 0 else "left") if horizontal else ("up" if sign > 0 else "down")
        _label(draw, p, unit * 1.2, f"scroll {way} {abs(clicks)}", font, (w, h))
    elif kind is not None:
        _caption(draw, _caption_text(dict(action)), font, (w, h), font_px)


def _annotated(png: bytes, action: Mapping[str, Any] | None, screen_size: tuple[int, int] | None,
               max_width: int | None) -> Image.Image:
    with Image.open(io.BytesIO(png)) as im:
        image = im.convert("RGB")
    source = screen_size if screen_size and screen_size[0] > 0 and screen_size[1] > 0 else image.size
    if max_width and image.width > max_width:
        image = image.resize((max_width, max(1, round(image.height * max_width / image.width))), Image.LANCZOS)
    if action and _valid(action):  # an action that doesn't validate is shown as json in the text, not drawn
        _draw(image, action, (image.width / source[0], image.height / source[1]))
    return image


def _valid(action: Mapping[str, Any]) -> bool:
    try:
        _ACTION.validate_python(dict(action))
    except ValidationError:
        return False
    return True


def annotate_step(png: bytes, action: dict[str, Any] | None, *, screen_size: tuple[int, int] | None = None,
                  max_width: int | None = None) -> bytes:
    """The screenshot with ``action`` (a pixel action dict, ``connectors.desktop.actions``) drawn on it, as PNG.
    Action pixels are screen pixels: ``screen_size`` maps them onto a screenshot of another size (default: the
    screenshot is the screen). ``max_width`` downscales first. Raises on undecodable image bytes."""
    out = io.BytesIO()
    _annotated(png, action, screen_size, max_width).save(out, format="PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------- html
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def describe_action(action: dict[str, Any] | None) -> str:
    """``describe`` of the pixel action; an action that no longer validates is shown as its json."""
    if not action:
        return "no action"
    try:
        return describe(_ACTION.validate_python(action))
    except ValidationError:
        return json.dumps(action, ensure_ascii=False, default=str)[:500]


def _data_uri(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85, subsampling=0, optimize=True)  # 4:4:4 keeps UI text legible
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _screenshot_html(step: StepRecord, screenshots: Mapping[str, bytes]) -> str:
    if not step.screenshot:
        return '<div class="placeholder">no screenshot recorded for this step</div>'
    data = screenshots.get(step.screenshot)
    if data is None:
        return f'<div class="placeholder">screenshot {_e(step.screenshot[:16])} not available</div>'
    screen = (step.screen_width, step.screen_height) if step.screen_width and step.screen_height else None
    try:
        image = _annotated(data, step.action, screen, MAX_WIDTH)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return f'<div class="placeholder">screenshot {_e(step.screenshot[:16])} could not be decoded</div>'
    return (f'<img src="{_data_uri(image)}" width="{image.width}" height="{image.height}" '
            f'alt="step {step.index} screenshot">')


def _timings_html(timings: Mapping[str, float]) -> str:
    if not timings:
        return "-"
    parts = [f"{_e(k)} {float(v):.2f} s" for k, v in timings.items() if isinstance(v, int | float)]
    return " &middot; ".join(parts) or "-"


def _step_html(step: StepRecord, screenshots: Mapping[str, bytes]) -> str:
    colour = STATUS_COLOURS.get(step.status, "#57606a")
    rows = [("action", _e(describe_action(step.action)))]
    if step.window_title:
        rows.append(("window", _e(step.window_title)))
    if step.detail:
        rows.append(("detail", _e(step.detail)))
    rows.append(("timings", _timings_html(step.timings)))
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (f'<section class="step" id="step-{step.index}">\n'
            f'<h2>Step {step.index} <span class="badge" style="background:{colour}">{_e(step.status)}</span></h2>\n'
            f'<div class="shot">{_screenshot_html(step, screenshots)}</div>\n'
            f'<table class="meta">{table}</table>\n'
            f'<details open><summary>model output</summary><pre>{_e(step.model_output) or "(empty)"}</pre>'
            f'</details>\n</section>')


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1000px;color:#1f2328;
background:#f6f8fa}
header,.step{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 20px;margin-bottom:18px}
h1{font-size:1.4em;margin:0 0 12px}h2{font-size:1.1em;margin:0 0 10px}
.badge{color:#fff;border-radius:10px;padding:2px 10px;font-size:.8em;font-weight:600;vertical-align:middle}
table{border-collapse:collapse}th{text-align:left;padding:3px 14px 3px 0;color:#57606a;font-weight:600;
vertical-align:top;white-space:nowrap}td{padding:3px 0;word-break:break-word}
.shot img{max-width:100%;height:auto;border:1px solid #d0d7de;border-radius:4px}
.placeholder{padding:40px;text-align:center;color:#57606a;background:#eaeef2;border-radius:4px}
pre{white-space:pre-wrap;word-break:break-word;background:#f6f8fa;border:1px solid #d0d7de;border-radius:4px;
padding:10px;font-size:.85em;max-height:420px;overflow:auto}
.meta{margin:10px 0}summary{cursor:pointer;color:#57606a}
"""


def render_report(*, goal: str, steps: list[StepRecord], screenshots: dict[str, bytes], outcome: str,
                  answer: str | None = None, title: str = "kimiray OS agent run") -> str:
    """One self-contained HTML page for the run; ``screenshots`` maps each step's blob ref to its PNG bytes
    (refs missing from it render a placeholder)."""
    total = sum(float(v) for s in steps for v in s.timings.values() if isinstance(v, int | float))
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.status] = counts.get(step.status, 0) + 1
    statuses = ", ".join(f"{_e(k)} {v}" for k, v in counts.items()) or "-"
    rows = [("goal", _e(goal)), ("outcome", _e(outcome))]
    if answer is not None:
        rows.append(("answer", _e(answer)))
    rows += [("steps", f"{len(steps)} ({statuses})"), ("total time", f"{total:.1f} s (sum of step timings)")]
    header = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    body = "\n".join(_step_html(s, screenshots) for s in steps) or '<p class="placeholder">no steps</p>'
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            f"<header><h1>{_e(title)}</h1><table>{header}</table></header>\n{body}\n</body></html>\n")
