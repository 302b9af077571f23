"""Write the agent's findings back into the PDF as highlights with notes, so a reviewer can check each answer
against its source in any PDF viewer.

Only verified citations are drawn: an unverified quote has no trustworthy location.  A citation across a page
break is drawn on each page it touches.  The highlight follows the
quoted text itself (PyMuPDF's search inside the cited blocks); when the search cannot find it (text extracted
differently than it is drawn, a fuzzy match) the cited blocks are highlighted instead, which is coarser but
never points at the wrong place.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pymupdf
from pydantic import BaseModel, Field

from pipelines.document.citations import Citation, CitationPart
from pipelines.document.types import DocumentError

ANNOT_TITLE = "kimiray"
_NOTE_SIZE = 20.0  # points; PyMuPDF's note icon
_PALETTE = [  # light colours that keep black text readable
    (1.0, 0.93, 0.35),
    (0.62, 0.9, 0.55),
    (0.55, 0.8, 1.0),
    (1.0, 0.7, 0.45),
    (0.85, 0.65, 1.0),
    (1.0, 0.6, 0.7),
]


class AnnotatedItem(BaseModel):
    """One extracted value to mark in the PDF."""

    label: str  # category / field name; the annotations' subject
    value: Any
    citations: list[Citation] = Field(default_factory=list)


def _colour(label: str) -> tuple[float, float, float]:
    """Stable colour per category, so one category looks the same on every page."""
    return _PALETTE[hashlib.sha1(label.encode()).digest()[0] % len(_PALETTE)]


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "; ".join(_value_text(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_value_text(v)}" for k, v in value.items())
    return "" if value is None else str(value)


def _quads(page: pymupdf.Page, citation: CitationPart) -> list:
    """Quads of the quoted text inside the cited blocks, else the blocks' rectangles.  Without blocks (a
    reader that kept none) the whole page is searched."""
    rects = [pymupdf.Rect(b) for b in citation.bboxes]
    clip = None
    if rects:
        clip = pymupdf.Rect(rects[0])
        for r in rects[1:]:
            clip |= r
        clip = (clip + (-2, -2, 2, 2)) & page.rect
    needle = " ".join(citation.quote.split())
    if needle:
        try:
            quads = page.search_for(needle, clip=clip, quads=True)
        except Exception:  # noqa: BLE001 - a search failure only costs precision: use the blocks
            quads = []
        if quads:
            return quads
    return [r.quad for r in rects if not r.is_empty]


def _note_point(page: pymupdf.Page, anchor: pymupdf.Rect, used: list[float]) -> pymupdf.Point:
    """Right margin, level with the highlight, moved down past notes already placed there."""
    x = max(page.rect.x0, page.rect.x1 - _NOTE_SIZE - 4)
    y = min(max(page.rect.y0, anchor.y0), page.rect.y1 - _NOTE_SIZE)
    while any(abs(y - u) < _NOTE_SIZE for u in used) and y + _NOTE_SIZE < page.rect.y1 - _NOTE_SIZE:
        y += _NOTE_SIZE
    used.append(y)
    return pymupdf.Point(x, y)


def annotate_pdf(pdf_bytes: bytes, items: list[AnnotatedItem], *, password: str | None = None) -> bytes:
    """A copy of the PDF with a highlight and a note per verified citation (title ``"kimiray"``, subject =
    the item's label, content ``"label: value"``).  An encrypted source needs its ``password`` and keeps its
    encryption in the output."""
    try:
        doc = pymupdf.open(stream=pdf_bytes, filetype="pdf")
    except Exception as e:  # noqa: BLE001 - PyMuPDF raises several types for unreadable input
        raise DocumentError(f"cannot open PDF: {e}", "corrupt") from None
    try:
        encrypted = bool(doc.needs_pass)
        if encrypted and not (password and doc.authenticate(password)):
            raise DocumentError("the PDF is encrypted: a correct password is needed", "encrypted")
        notes_y: dict[int, list[float]] = {}
        for item in items:
            text = f"{item.label}: {_value_text(item.value)}"
            colour = _colour(item.label)
            # a citation across a page break is highlighted on every page it touches
            for c in [part for c in item.citations if c.verified for part in c.segments()]:
                if not 1 <= c.page <= doc.page_count:
                    continue
                page = doc[c.page - 1]
                quads = _quads(page, c)
                if not quads:
                    continue
                info = {"title": ANNOT_TITLE, "subject": item.label, "content": text}
                hl = page.add_highlight_annot(quads)
                hl.set_colors(stroke=colour)
                hl.set_info(**info)
                hl.update()
                anchor = quads[0].rect
                note = page.add_text_annot(_note_point(page, anchor, notes_y.setdefault(c.page, [])), text)
                note.set_colors(stroke=colour)
                note.set_info(**info)
                note.update()
        options: dict[str, Any] = {"garbage": 3, "deflate": True}
        if encrypted:
            options["encryption"] = pymupdf.PDF_ENCRYPT_KEEP
        return doc.tobytes(**options)
    finally:
        doc.close()
