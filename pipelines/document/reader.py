"""PDF → ``Document``: pages in reading order with blocks, tables, sections, and rendered images of scanned pages.

Pages are read one at a time (``iter_pages`` / ``PdfReader.pages``) and nothing of PyMuPDF's page objects or
pixmaps outlives its page, so memory stays flat however long the file is; only scanned pages are rendered.
Running headers/footers are learned from a sample of pages before the first page is produced.

Scanned pages (no text layer, text drawn as outlines, or a garbage text layer) are rendered for the model and, with
``ocr=True``, given an OCR text layer with word boxes (``pipelines.document.ocr``) so quotes from them can be
verified and highlighted.  OCR is bounded by ``max_ocr_pages`` and ``ocr_time_s`` (checked between pages); scanned
pages past either bound stay image-only and are counted in ``Document.ocr_skipped``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType

import re
import time
import unicodedata

import pymupdf

from pipelines.document import furniture, ocr
from pipelines.document.layout import TEXT_FLAGS, Line, RawBlock, drop_lines_inside, reading_order, text_blocks
from pipelines.document.source import Source, open_source
from pipelines.document.structure import SectionTracker, split_at_headings
from pipelines.document.tables import find_tables
from pipelines.document.types import Block, Document, DocumentError, Page, Section

DEFAULT_MAX_BYTES = 200 * 2**20
SCANNED_MAX_CHARS = 20  # fewer visible characters than this on a page with an image: read the image instead
SCANNED_MIN_IMAGE_SHARE = 0.1  # of the page area
OUTLINED_MIN_DRAWINGS = 200  # no text but this many vector paths: text drawn as outlines, read the image
_SHRINK_EVERY = 25  # pages between trims of MuPDF's resource cache (decoded images, fonts)
DEFAULT_MAX_OCR_PAGES = 500
DEFAULT_OCR_TIME_S = 900.0
OCR_PAGE_MIN_S = 30.0  # a page started inside the budget gets at least this long before its OCR is killed
GARBAGE_MIN_CHARS = 40  # a text layer this long or longer is judged for garbage
GARBAGE_SHARE = 0.3  # share of unreadable characters (replacement, private use, controls) that makes it garbage

ProgressCallback = Callable[[int, int], None]


class PdfReader:
    """An opened, validated PDF, read page by page. Use as a context manager, or call ``close()``."""

    def __init__(
        self,
        source: Source,
        *,
        password: str | None = None,
        max_pages: int | None = None,
        truncate: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        render_dpi: int = 110,
        ocr: bool = False,
        ocr_language: str = ocr.DEFAULT_LANGUAGE,
        max_ocr_pages: int = DEFAULT_MAX_OCR_PAGES,
        ocr_time_s: float = DEFAULT_OCR_TIME_S,
    ) -> None:
        self._opened = open_source(
            source, password=password, max_pages=max_pages, truncate=truncate, max_bytes=max_bytes
        )
        self.render_dpi = render_dpi
        self.ocr = ocr
        self.ocr_language = ocr_language
        self.max_ocr_pages = max_ocr_pages
        self.ocr_time_s = ocr_time_s
        self.ocr_pages = 0  # pages given an OCR text layer so far
        self.ocr_skipped = 0  # scanned pages left image-only because an OCR bound was reached
        self._ocr_seconds = 0.0
        self._tracker = SectionTracker()
        self._patterns: set[str] | None = None

    # -- what is known before reading pages
    @property
    def sha256(self) -> str:
        return self._opened.sha256

    @property
    def page_count(self) -> int:
        """Pages that will be read (the first ``max_pages`` when truncating)."""
        return self._opened.pages_to_read

    @property
    def total_pages(self) -> int:
        return self._opened.total_pages

    @property
    def title(self) -> str | None:
        return self._opened.title

    @property
    def metadata(self) -> dict[str, str]:
        return self._opened.metadata

    @property
    def sections(self) -> list[Section]:
        """Sections found so far (all of them once every page has been read)."""
        return self._tracker.sections

    # -- reading
    def pages(self, on_page: ProgressCallback | None = None) -> Iterator[Page]:
        """Pages in order; ``on_page(done, total)`` after each. Raises ``DocumentError("corrupt")`` on a page
        MuPDF cannot read."""
        patterns = self._furniture()
        self._tracker = SectionTracker()  # a second pass starts the section list afresh
        self.ocr_pages = self.ocr_skipped = 0
        self._ocr_seconds = 0.0
        total = self.page_count
        for i in range(total):
            page = self._read_page(i, patterns)
            if (i + 1) % _SHRINK_EVERY == 0:
                pymupdf.TOOLS.store_shrink(100)
            if on_page is not None:
                on_page(i + 1, total)
            yield page

    def document(self, on_page: ProgressCallback | None = None) -> Document:
        pages = list(self.pages(on_page))
        return Document(
            sha256=self.sha256,
            page_count=len(pages),
            pages=pages,
            sections=list(self.sections),
            title=self.title,
            metadata=dict(self.metadata),
            ocr_pages=self.ocr_pages,
            ocr_skipped=self.ocr_skipped,
        )

    def close(self) -> None:
        self._opened.doc.close()

    def __enter__(self) -> PdfReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals
    def _furniture(self) -> set[str]:
        if self._patterns is None:
            self._patterns = furniture.learn(self.page_count, self._sample_lines)
        return self._patterns

    def _sample_lines(self, index: int) -> tuple[list[Line], float] | None:
        try:
            page = self._opened.doc.load_page(index)
            blocks = text_blocks(page.get_text("dict", flags=TEXT_FLAGS))
            return [ln for b in blocks for ln in b.lines], page.rect.height
        except Exception:  # noqa: BLE001 - a bad page just doesn't vote; reading it later reports it
            return None

    def _read_page(self, index: int, patterns: set[str]) -> Page:
        number = index + 1
        try:
            page = self._opened.doc.load_page(index)
            width, height = page.rect.width, page.rect.height
            blocks = text_blocks(page.get_text("dict", flags=TEXT_FLAGS))
            blocks, removed = furniture.strip(blocks, patterns, height)
            png: bytes | None = None
            tables = []
            if _looks_scanned(page, blocks) or _garbage_text(blocks):
                png = page.get_pixmap(dpi=self.render_dpi, alpha=False).tobytes("png")
                read = self._ocr(page)
                if read is None:
                    return Page(number=number, width=width, height=height, text="", scanned=True, image_png=png,
                                removed=removed)
                # one block per OCR line: a citation's boxes are then the lines it touches, not whole paragraphs
                lines = [RawBlock(lines=[ln]) for b in read for ln in b.lines]
                blocks, removed = furniture.strip(lines, patterns, height)
            else:
                tables = find_tables(page, number)
            del page
        except DocumentError:
            raise
        except Exception as exc:  # noqa: BLE001 - never let a raw MuPDF error escape
            raise DocumentError(f"page {number} cannot be read: {exc}", "corrupt") from None
        blocks = drop_lines_inside(blocks, [t.bbox for t in tables])
        blocks += [RawBlock(kind="table", table_markdown=t.markdown, table_bbox=t.bbox) for t in tables]
        ordered, columns = reading_order(split_at_headings(blocks))
        out, texts, pos = [], [], 0
        for raw in ordered:
            self._tracker.visit(raw, number)
            text = raw.text
            if texts:
                pos += 2  # the "\n\n" joining blocks
            out.append(
                Block(
                    page=number,
                    bbox=raw.bbox,
                    text=text,
                    kind=raw.kind,  # type: ignore[arg-type]
                    char_start=pos,
                    char_end=pos + len(text),
                    section=raw.section,
                )
            )
            texts.append(text)
            pos += len(text)
        return Page(
            number=number,
            width=width,
            height=height,
            text="\n\n".join(texts),
            blocks=out,
            tables=tables,
            columns=columns,
            removed=removed,
            scanned=png is not None,
            ocr=png is not None,
            image_png=png,
        )

    def _ocr(self, page: pymupdf.Page) -> list[RawBlock] | None:
        """OCR blocks of a scanned page; None when OCR is off or a bound is reached.  Raises
        ``DocumentError("ocr_unavailable")`` when OCR is on but Tesseract's language data is missing."""
        if not self.ocr:
            return None
        if self.ocr_pages >= self.max_ocr_pages or self._ocr_seconds >= self.ocr_time_s:
            self.ocr_skipped += 1
            return None
        tessdata = ocr.require_tessdata(self.ocr_language)
        started = time.monotonic()
        # the budget's remainder (at least OCR_PAGE_MIN_S) bounds this page too: its child is killed past it, and
        # the time spent then uses up the budget, so no later page starts
        try:
            blocks = ocr.ocr_blocks(page, tessdata=tessdata, language=self.ocr_language,
                                    timeout_s=max(OCR_PAGE_MIN_S, self.ocr_time_s - self._ocr_seconds))
        except ocr.OcrTimeout:
            self.ocr_skipped += 1
            return None
        finally:
            self._ocr_seconds += time.monotonic() - started
        self.ocr_pages += 1
        return blocks


_WORD = re.compile(r"[A-Za-z]*[AEIOUYaeiouy][A-Za-z]*")


def _garbage_text(blocks: list[RawBlock]) -> bool:
    """A text layer that cannot be read (a font without a usable Unicode map): replacement characters, private-use
    code points and control characters make up a large share of it, or it is long but has hardly any letters and
    no words (a dot-leader table of contents has both)."""
    text = " ".join(ln.text for b in blocks for ln in b.lines if b.table_markdown is None)
    chars = [c for c in text if not c.isspace()]
    if len(chars) < GARBAGE_MIN_CHARS:
        return False
    bad = sum(c == "\ufffd" or unicodedata.category(c) in ("Co", "Cc", "Cs", "Cn") for c in chars)
    if bad >= GARBAGE_SHARE * len(chars):
        return True
    readable = sum(c.isalnum() for c in chars)
    words = sum(len(w) >= 3 for w in _WORD.findall(text))
    return readable < GARBAGE_SHARE * len(chars) and words < 5


def _looks_scanned(page: pymupdf.Page, blocks: list[RawBlock]) -> bool:
    chars = sum(len(ln.text.replace(" ", "")) for b in blocks for ln in b.lines)
    if chars >= SCANNED_MAX_CHARS:
        return False
    area = abs(page.rect) or 1.0
    image_area = 0.0
    for info in page.get_image_info():
        r = pymupdf.Rect(info["bbox"]) & page.rect
        image_area += abs(r)
    if image_area >= SCANNED_MIN_IMAGE_SHARE * area:
        return True
    return chars == 0 and len(page.get_cdrawings()) >= OUTLINED_MIN_DRAWINGS


def open_pdf(
    source: Source,
    *,
    password: str | None = None,
    max_pages: int | None = None,
    truncate: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    render_dpi: int = 110,
    **ocr_options: object,
) -> PdfReader:
    """Open and validate (raising ``DocumentError``) without reading pages yet.  ``ocr_options``: ``ocr``,
    ``ocr_language``, ``max_ocr_pages``, ``ocr_time_s`` (see :class:`PdfReader`)."""
    return PdfReader(
        source, password=password, max_pages=max_pages, truncate=truncate, max_bytes=max_bytes, render_dpi=render_dpi,
        **ocr_options,  # type: ignore[arg-type]
    )


def iter_pages(
    source: Source,
    *,
    password: str | None = None,
    max_pages: int | None = None,
    truncate: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    render_dpi: int = 110,
    on_page: ProgressCallback | None = None,
    **ocr_options: object,
) -> Iterator[Page]:
    """Pages one at a time (bounded memory). Validation errors are raised on the first ``next()``."""
    with open_pdf(
        source, password=password, max_pages=max_pages, truncate=truncate, max_bytes=max_bytes, render_dpi=render_dpi,
        **ocr_options,
    ) as reader:
        yield from reader.pages(on_page)


def read_pdf(
    source: Source,
    *,
    password: str | None = None,
    max_pages: int | None = None,
    truncate: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    render_dpi: int = 110,
    on_page: ProgressCallback | None = None,
    **ocr_options: object,
) -> Document:
    """The whole document. ``truncate=True`` reads the first ``max_pages`` of a longer file instead of refusing it
    (``metadata["truncated"] == "true"``)."""
    with open_pdf(
        source, password=password, max_pages=max_pages, truncate=truncate, max_bytes=max_bytes, render_dpi=render_dpi,
        **ocr_options,
    ) as reader:
        return reader.document(on_page)
