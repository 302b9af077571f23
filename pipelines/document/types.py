"""What a read document looks like to the rest of the system (agents, citations, annotations, scoring).

Coordinates are PDF points in PyMuPDF's page space (origin top-left, y down), pages are numbered from 1.
``Page.text`` is the page's kept text (headers/footers removed) in reading order; every ``Block`` knows its
character span in it, which is how a quoted span maps back to a bounding box.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

BBox = tuple[float, float, float, float]


class DocumentError(ValueError):
    """A document we refuse, with a machine code: ``encrypted`` (no/wrong password), ``corrupt``, ``empty``
    (zero pages), ``not_pdf``, ``too_many_pages``, ``too_large``, ``ocr_unavailable`` (scanned pages, no OCR),
    ``unsupported_format`` (an old binary .doc), ``too_deep`` (an e-mail nested past the limit)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Block(BaseModel):
    page: int
    bbox: BBox
    text: str
    kind: Literal["text", "heading", "table"] = "text"
    char_start: int  # span of this block in Page.text
    char_end: int
    section: str | None = None  # number or title of the section the block belongs to


class Table(BaseModel):
    page: int
    bbox: BBox
    rows: list[list[str]]
    markdown: str


class Section(BaseModel):
    number: str | None  # "12", "12.3", "IV" …
    title: str
    page: int
    level: int = 1


class Page(BaseModel):
    number: int
    width: float
    height: float
    text: str
    blocks: list[Block] = Field(default_factory=list)
    tables: list[Table] = Field(default_factory=list)
    scanned: bool = False  # no usable text layer: the model reads the rendered image instead
    ocr: bool = False  # ``text`` and ``blocks`` (OCR lines with their boxes) come from OCR of the scanned image
    image_png: bytes | None = Field(None, repr=False)  # rendered page for scanned pages
    columns: int = 1
    removed: list[str] = Field(default_factory=list, description="header/footer lines removed from this page")


class Document(BaseModel):
    sha256: str
    page_count: int
    pages: list[Page]
    sections: list[Section] = Field(default_factory=list)
    title: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    ocr_pages: int = 0  # scanned pages given an OCR text layer
    ocr_skipped: int = 0  # scanned pages left image-only because the OCR page or time bound was reached


class Anchor(BaseModel):
    """One paragraph of a file rendered to PDF (Word, e-mail): where it was in the original (``label``, e.g.
    "paragraph 12" or "message 2 / attachment terms.pdf") and its text as rendered."""

    label: str
    text: str


class GoldClause(BaseModel):
    """Ground truth of a synthetic (or CUAD) contract: this category's text is on this page."""

    category: str
    text: str
    page: int | None = None  # None for CUAD annotations without page information
    start: int | None = None  # char offset in the document text (CUAD answer_start), when known


class PredictedClause(BaseModel):
    category: str
    text: str
    page: int | None = None
