"""The episode as an MP4: each step's screenshot, with the action drawn on it, a few frames per step.

Built from the screenshots the agent already took (one per step, exactly what the model saw before acting), so a
recording costs no extra capture during the run and matches the trajectory and the HTML report step for step.
Bounded: frames are downscaled to ``max_side``, at most ``max_frames`` frames, and when the file still exceeds
``max_bytes`` it is encoded again smaller. The overlay shows ``describe(action)`` of the stored (placeholder-only)
action: a secret's value is never drawn.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from agents.os_agent.trajectory import StepRecord

MAX_BYTES = 20 * 1024 * 1024
_COLOURS = {"executed": (230, 40, 40), "terminal": (30, 160, 60), "asked": (40, 90, 220)}


def _overlay(image: Image.Image, record: StepRecord, scale: float) -> Image.Image:
    from pydantic import TypeAdapter

    from connectors.desktop.actions import ScreenAction, describe

    frame = image.convert("RGB")
    draw = ImageDraw.Draw(frame)
    colour = _COLOURS.get(record.status, (200, 120, 0))
    label = f"step {record.index + 1}: {record.status}"
    if record.action:
        action = TypeAdapter(ScreenAction).validate_python(record.action)
        label = f"step {record.index + 1}: {describe(action)} -> {record.status}"
        points = [(x * scale, y * scale) for x, y in action.points()]
        for x, y in points:
            r = max(6, round(12 * scale))
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=3)
            draw.line([x - r - 4, y, x + r + 4, y], fill=colour, width=1)
            draw.line([x, y - r - 4, x, y + r + 4], fill=colour, width=1)
        if len(points) == 2:
            draw.line([points[0], points[1]], fill=colour, width=3)
    elif record.detail:
        label += f" ({record.detail[:80]})"
    font = ImageFont.load_default()
    box = draw.textbbox((0, 0), label, font=font)
    draw.rectangle([0, 0, min(frame.width, box[2] + 12), box[3] + 10], fill=(0, 0, 0))
    draw.text((6, 4), label, fill=colour if record.status != "executed" else (255, 255, 255), font=font)
    return frame


def _encode(frames: list[Image.Image], fps: int) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "28", "preset": "veryfast"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def render_recording(steps: Sequence[StepRecord], screenshots: Mapping[str, bytes], *, fps: int = 2,
                     frames_per_step: int = 2, max_side: int = 1024, max_frames: int = 600,
                     max_bytes: int = MAX_BYTES) -> bytes | None:
    """The MP4 bytes, or None when no step has a screenshot."""
    shown = [(r, screenshots[r.screenshot]) for r in steps if r.screenshot and r.screenshot in screenshots]
    if not shown:
        return None
    per_step = max(1, min(frames_per_step, max_frames // len(shown)))
    shown = shown[-(max_frames // per_step):]  # past the cap, the latest steps are kept
    side = max_side
    while True:
        frames = []
        for record, png in shown:
            image = Image.open(io.BytesIO(png))
            scale = min(1.0, side / max(image.size))
            w, h = (max(2, round(image.width * scale) // 2 * 2), max(2, round(image.height * scale) // 2 * 2))
            if (w, h) != image.size:
                image = image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
            frame = _overlay(image, record, w / max(1, record.screen_width or image.width))
            frames.extend([frame] * per_step)
        size = frames[0].size
        frames = [f if f.size == size else f.resize(size) for f in frames]
        data = _encode(frames, fps)
        if len(data) <= max_bytes or side <= 240:
            return data if len(data) <= max_bytes else None
        side = side * 2 // 3
