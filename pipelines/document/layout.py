"""Page geometry: text lines out of PyMuPDF, and the reading order of blocks (columns included).

PyMuPDF returns blocks in content-stream order, which is whatever the producing program wrote first (footers
before bodies, right columns before left ones). Here blocks are re-ordered from their positions: a vertical
gutter that no narrow block crosses splits the page into columns, read left to right, each top to bottom;
blocks that cross the gutter (titles, tables, full-width paragraphs) cut the page into horizontal bands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pymupdf

from pipelines.document.types import BBox

# Expand ligatures (no PRESERVE_LIGATURES), normalise whitespace, skip image payloads (no PRESERVE_IMAGES).
TEXT_FLAGS = pymupdf.TEXT_MEDIABOX_CLIP | pymupdf.TEXT_CID_FOR_UNKNOWN_UNICODE

_BOLD = 16  # span flag bit


@dataclass
class Line:
    bbox: BBox
    text: str
    bold: bool = False

    @property
    def center(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2


@dataclass
class RawBlock:
    """A block under construction: text lines (or a table's Markdown) with a bbox and a kind."""

    lines: list[Line] = field(default_factory=list)
    kind: str = "text"  # "text" | "heading" | "table"
    table_markdown: str | None = None
    table_bbox: BBox | None = None
    section: str | None = None

    @property
    def bbox(self) -> BBox:
        if self.table_bbox is not None:
            return self.table_bbox
        return union([line.bbox for line in self.lines])

    @property
    def text(self) -> str:
        if self.table_markdown is not None:
            return self.table_markdown
        return "\n".join(line.text for line in self.lines)


def union(boxes: Sequence[BBox]) -> BBox:
    return (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def text_blocks(page_dict: dict[str, Any]) -> list[RawBlock]:
    """Text blocks of ``page.get_text("dict")`` as lists of non-empty lines (spans joined)."""
    blocks: list[RawBlock] = []
    for block in page_dict.get("blocks", []):
        if block.get("type", 0) != 0:
            continue
        lines: list[Line] = []
        for line in block.get("lines", []):
            spans = line.get("spans", [])
            text = "".join(s.get("text", "") for s in spans).strip()
            if not text:
                continue
            chars = sum(len(s.get("text", "").strip()) for s in spans) or 1
            bold_chars = sum(len(s.get("text", "").strip()) for s in spans if s.get("flags", 0) & _BOLD)
            lines.append(Line(bbox=tuple(line["bbox"]), text=" ".join(text.split()), bold=bold_chars * 2 > chars))
        if lines:
            blocks.append(RawBlock(lines=lines))
    return blocks


def drop_lines_inside(blocks: list[RawBlock], boxes: Sequence[BBox], tol: float = 1.0) -> list[RawBlock]:
    """Remove lines whose centre lies in one of ``boxes`` (text already represented by a table)."""
    if not boxes:
        return blocks
    kept: list[RawBlock] = []
    for block in blocks:
        lines = [ln for ln in block.lines if not any(_inside(ln.center, box, tol) for box in boxes)]
        if lines:
            block.lines = lines
            kept.append(block)
    return kept


def _inside(point: tuple[float, float], box: BBox, tol: float) -> bool:
    x, y = point
    return box[0] - tol <= x <= box[2] + tol and box[1] - tol <= y <= box[3] + tol


# ---------------------------------------------------------------------------------------------- reading order


def reading_order(blocks: list[RawBlock]) -> tuple[list[RawBlock], int]:
    """Blocks in reading order and the number of columns found on the page."""
    gutters = find_gutters(blocks)
    if not gutters:
        return _rows_then_x(blocks), 1
    ordered: list[RawBlock] = []
    band: list[RawBlock] = []
    for block in sorted(blocks, key=lambda b: (b.bbox[1], b.bbox[0])):
        if _crosses(block.bbox, gutters):
            ordered.extend(_band_order(band, gutters))
            band = []
            ordered.append(block)
        else:
            band.append(block)
    ordered.extend(_band_order(band, gutters))
    return ordered, len(gutters) + 1


def find_gutters(blocks: list[RawBlock], min_gap: float = 8.0) -> list[float]:
    """x positions of column gutters: gaps in the x-coverage of narrow blocks, away from the page edges,
    with text on both sides that sits side by side (overlapping in y) and carries a fair share of the text."""
    if len(blocks) < 2:
        return []
    x0 = min(b.bbox[0] for b in blocks)
    x1 = max(b.bbox[2] for b in blocks)
    width = x1 - x0
    if width <= 0:
        return []
    narrow = [b for b in blocks if b.bbox[2] - b.bbox[0] < 0.6 * width]
    if len(narrow) < 2:
        return []
    gaps = _coverage_gaps([(b.bbox[0], b.bbox[2]) for b in narrow], min_gap)
    gutters: list[float] = []
    for left, right in gaps:
        g = (left + right) / 2
        if not (x0 + 0.2 * width <= g <= x1 - 0.2 * width):
            continue
        if _valid_gutter(narrow, g):
            gutters.append(g)
    return gutters


def _coverage_gaps(intervals: list[tuple[float, float]], min_gap: float) -> list[tuple[float, float]]:
    gaps: list[tuple[float, float]] = []
    intervals = sorted(intervals)
    end = intervals[0][1]
    for a, b in intervals[1:]:
        if a - end >= min_gap:
            gaps.append((end, a))
        end = max(end, b)
    return gaps


def _valid_gutter(narrow: list[RawBlock], g: float) -> bool:
    left = [b for b in narrow if b.bbox[2] <= g]
    right = [b for b in narrow if b.bbox[0] >= g]
    if not left or not right:
        return False
    chars_l = sum(len(b.text) for b in left)
    chars_r = sum(len(b.text) for b in right)
    if min(chars_l, chars_r) < 0.1 * (chars_l + chars_r) or min(chars_l, chars_r) < 40:
        return False
    # side by side: the two sides' vertical extents overlap for a good part of the shorter one
    ly0, ly1 = min(b.bbox[1] for b in left), max(b.bbox[3] for b in left)
    ry0, ry1 = min(b.bbox[1] for b in right), max(b.bbox[3] for b in right)
    overlap = min(ly1, ry1) - max(ly0, ry0)
    return overlap > 0.3 * min(ly1 - ly0, ry1 - ry0)


def _crosses(bbox: BBox, gutters: list[float], tol: float = 2.0) -> bool:
    return any(bbox[0] < g - tol and bbox[2] > g + tol for g in gutters)


def _band_order(band: list[RawBlock], gutters: list[float]) -> list[RawBlock]:
    columns: list[list[RawBlock]] = [[] for _ in range(len(gutters) + 1)]
    for block in band:
        cx = (block.bbox[0] + block.bbox[2]) / 2
        columns[sum(cx > g for g in gutters)].append(block)
    return [b for col in columns for b in _rows_then_x(col)]


def _rows_then_x(blocks: list[RawBlock], tol: float = 2.0) -> list[RawBlock]:
    """Top to bottom; blocks starting on the same line (within ``tol``) left to right."""
    ordered: list[RawBlock] = []
    row: list[RawBlock] = []
    for block in sorted(blocks, key=lambda b: (b.bbox[1], b.bbox[0])):
        if row and block.bbox[1] - row[0].bbox[1] > tol:
            ordered.extend(sorted(row, key=lambda b: b.bbox[0]))
            row = []
        row.append(block)
    ordered.extend(sorted(row, key=lambda b: b.bbox[0]))
    return ordered
