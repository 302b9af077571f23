"""Synthetic ScreenSpot-format grounding data, drawn with Pillow: no download, known ground truth.

Each image is a flat "application window": a title bar (window title, a close button), buttons with text labels,
text fields with placeholder text, and icons drawn as coloured shapes, all at random non-overlapping positions.
Every target is unique in its image (label, or colour + shape), so each instruction names exactly one element.

The json is a ScreenSpot v1 file (see ``agents.os_agent.grounding``): a list of
``{"img_filename", "bbox": [x, y, w, h] (pixels), "instruction", "data_type": "text" | "icon",
"data_source": "synthetic"}``; it is also the oracle that tests score a model against.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

JSON_NAME = "screenspot_synthetic.json"
BUTTON_LABELS = ["Save", "Open", "Cancel", "Submit", "Export", "Print", "Search", "Settings", "Delete", "Share",
                 "Refresh", "Help", "Upload", "Next", "Back", "Apply"]
FIELD_LABELS = ["Name", "Email", "Address", "Password", "Phone", "City", "Username", "Comment"]
COLOURS = {"red": (214, 40, 40), "green": (40, 160, 70), "blue": (40, 90, 210), "orange": (240, 140, 20),
           "purple": (140, 60, 190)}
SHAPES = ["circle", "square", "triangle", "diamond"]
_BACKGROUNDS = [(246, 246, 248), (236, 240, 244), (250, 247, 240), (240, 244, 238)]
_TITLE_BARS = [(52, 58, 72), (34, 86, 140), (70, 70, 70), (90, 50, 110)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


class _Layout:
    """Rejection-sampled placement of rectangles that keep ``gap`` pixels apart inside ``area``."""

    def __init__(self, rng: random.Random, area: tuple[int, int, int, int], gap: int) -> None:
        self.rng, self.area, self.gap = rng, area, gap
        self.boxes: list[tuple[int, int, int, int]] = []

    def place(self, w: int, h: int) -> tuple[int, int, int, int] | None:
        x0, y0, x1, y1 = self.area
        if w > x1 - x0 or h > y1 - y0:
            return None
        for _ in range(400):
            x = self.rng.randint(x0, x1 - w)
            y = self.rng.randint(y0, y1 - h)
            box = (x, y, x + w, y + h)
            if all(box[2] + self.gap <= b[0] or b[2] + self.gap <= box[0] or box[3] + self.gap <= b[1]
                   or b[3] + self.gap <= box[1] for b in self.boxes):
                self.boxes.append(box)
                return box
        return None


def _shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


def _entry(filename: str, box: tuple[int, int, int, int], instruction: str, data_type: str) -> dict:
    x0, y0, x1, y1 = box
    return {"img_filename": filename, "bbox": [x0, y0, x1 - x0, y1 - y0], "instruction": instruction,
            "data_type": data_type, "data_source": "synthetic"}


def _draw_screen(rng: random.Random, size: tuple[int, int], filename: str, index: int,
                 n_buttons: int, n_fields: int, n_icons: int) -> tuple[Image.Image, list[dict]]:
    width, height = size
    unit = max(0.5, min(width, height) / 720)  # element sizes follow the screen size
    image = Image.new("RGB", size, rng.choice(_BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    font = _font(max(10, round(16 * unit)))
    entries: list[dict] = []

    bar_h = max(24, round(36 * unit))
    draw.rectangle((0, 0, width - 1, bar_h - 1), fill=rng.choice(_TITLE_BARS))
    draw.text((round(12 * unit), bar_h // 2), f"Synthetic App {index + 1} - document{index + 1}.txt",
              font=font, fill=(240, 240, 240), anchor="lm")
    side = bar_h - round(12 * unit)
    close = (width - side - round(8 * unit), (bar_h - side) // 2, width - round(8 * unit), (bar_h + side) // 2)
    draw.rectangle(close, fill=(200, 50, 50))
    pad = max(3, side // 4)
    draw.line((close[0] + pad, close[1] + pad, close[2] - pad, close[3] - pad), fill="white", width=2)
    draw.line((close[0] + pad, close[3] - pad, close[2] - pad, close[1] + pad), fill="white", width=2)
    entries.append(_entry(filename, close, "close the window", "icon"))

    margin = round(16 * unit)
    layout = _Layout(rng, (margin, bar_h + margin, width - margin, height - margin), gap=round(14 * unit))
    for label in rng.sample(BUTTON_LABELS, n_buttons):
        tw, th = _text_size(draw, label, font)
        box = layout.place(tw + round(36 * unit), max(th + round(18 * unit), round(36 * unit)))
        if box is None:
            continue
        draw.rounded_rectangle(box, radius=round(6 * unit), fill=(66, 120, 220), outline=(40, 80, 170), width=1)
        draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), label, font=font, fill="white", anchor="mm")
        entries.append(_entry(filename, box, f"click the '{label}' button", "text"))
    for label in rng.sample(FIELD_LABELS, n_fields):
        box = layout.place(round(rng.randint(220, 320) * unit), round(36 * unit))
        if box is None:
            continue
        draw.rectangle(box, fill="white", outline=(150, 150, 160), width=1)
        draw.text((box[0] + round(10 * unit), (box[1] + box[3]) / 2), label, font=font, fill=(140, 140, 150),
                  anchor="lm")
        entries.append(_entry(filename, box, f"click the '{label}' text field", "text"))
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n_icons)
    for colour, shape in kinds:
        side = round(40 * unit)
        box = layout.place(side, side)
        if box is None:
            continue
        _shape(draw, shape, (box[0], box[1], box[2] - 1, box[3] - 1), COLOURS[colour])
        entries.append(_entry(filename, box, f"click the {colour} {shape} icon", "icon"))
    return image, entries


def make_screenspot_dataset(dir: str | Path, n_images: int = 4, size: tuple[int, int] = (1280, 720), seed: int = 0,
                            *, buttons: int = 4, fields: int = 2, icons: int = 3) -> Path:
    """Write ``n_images`` PNG screenshots and their ScreenSpot v1 json into ``dir``; returns the json's path.
    Images are ``synthetic_000.png``...; the same seed gives the same files."""
    if n_images < 1:
        raise ValueError("n_images must be at least 1")
    if buttons > len(BUTTON_LABELS) or fields > len(FIELD_LABELS) or icons > len(COLOURS) * len(SHAPES):
        raise ValueError("more elements asked for than there are distinct labels / icons")
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    for i in range(n_images):
        rng = random.Random(seed * 100_003 + i)
        filename = f"synthetic_{i:03d}.png"
        image, items = _draw_screen(rng, size, filename, i, buttons, fields, icons)
        image.save(out / filename, format="PNG")
        entries.extend(items)
    path = out / JSON_NAME
    path.write_text(json.dumps(entries, indent=1))
    return path
