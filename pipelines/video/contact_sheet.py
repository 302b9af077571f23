"""A contact sheet: sampled frames as one PNG grid with "mm:ss" (and a caption) under each thumbnail.

Useful both for people (what did the agent look at?) and as a single cheap image for the model when the frame
budget is tight.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from pipelines.video.sample import format_ts

__all__ = ["contact_sheet", "sheet_cells", "sheet_layout"]

PAD = 8
FONT_SIZE = 14
CAPTION_LINES = 2


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def sheet_layout(
    frames: Sequence[tuple[float, Image.Image, str | None]], *, columns: int = 4, thumb_width: int = 240
) -> tuple[int, int, int, int]:
    """``(sheet_width, sheet_height, cell_height, text_height)``: every cell is ``thumb_width`` wide and as tall as
    the tallest thumbnail plus room for the time and ``CAPTION_LINES`` caption lines."""
    if not frames:
        raise ValueError("no frames for the contact sheet")
    if columns <= 0 or thumb_width <= 0:
        raise ValueError("columns and thumb_width must be positive")
    cols = min(columns, len(frames))
    rows = -(-len(frames) // cols)
    thumb_h = max(max(1, round(im.height * thumb_width / im.width)) for _, im, _ in frames)
    has_caption = any(c for _, _, c in frames)
    text_h = (FONT_SIZE + 4) * (1 + (CAPTION_LINES if has_caption else 0))
    cell_h = thumb_h + text_h
    return PAD + cols * (thumb_width + PAD), PAD + rows * (cell_h + PAD), cell_h, text_h


def sheet_cells(
    frames: Sequence[tuple[float, Image.Image, str | None]], *, columns: int = 4, thumb_width: int = 240
) -> list[tuple[int, int, int, int]]:
    """The pixel box ``(x0, y0, x1, y1)`` of each frame's cell (thumbnail and its caption) in the sheet, in the
    frames' order: a viewer can point at the frame nearest a time."""
    _, _, cell_h, _ = sheet_layout(frames, columns=columns, thumb_width=thumb_width)
    cols = min(columns, len(frames))
    boxes = []
    for i in range(len(frames)):
        x = PAD + (i % cols) * (thumb_width + PAD)
        y = PAD + (i // cols) * (cell_h + PAD)
        boxes.append((x, y, x + thumb_width, y + cell_h))
    return boxes


def contact_sheet(
    frames: Sequence[tuple[float, Image.Image, str | None]], *, columns: int = 4, thumb_width: int = 240
) -> bytes:
    """PNG bytes of the grid, frames in the given order (left to right, top to bottom)."""
    width, height, cell_h, text_h = sheet_layout(frames, columns=columns, thumb_width=thumb_width)
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = _font(FONT_SIZE)
    chars = max(8, thumb_width // (FONT_SIZE // 2 + 1))
    for (t, image, caption), (x, y, _, _) in zip(frames, sheet_cells(frames, columns=columns,
                                                                      thumb_width=thumb_width)):
        thumb_h = max(1, round(image.height * thumb_width / image.width))
        sheet.paste(image.convert("RGB").resize((thumb_width, thumb_h), Image.Resampling.BILINEAR), (x, y))
        ty = y + cell_h - text_h + 2
        draw.text((x, ty), format_ts(t), fill=(255, 220, 80), font=font)
        if caption:
            lines = textwrap.wrap(caption, chars)[:CAPTION_LINES]
            for k, line in enumerate(lines):
                draw.text((x, ty + (k + 1) * (FONT_SIZE + 4)), line, fill=(230, 230, 230), font=font)
    out = io.BytesIO()
    sheet.save(out, format="PNG", optimize=False)
    return out.getvalue()
