"""PDF → ``Document``: pages in reading order with blocks, tables, sections, and rendered images of scanned pages.

Pages are read one at a time (``iter_pages`` / ``PdfReader.pages``) and nothing of PyMuPDF's page objects or
pixmaps outlives its page, so memory stays flat however long the file is; only scanned pages are rendered.
Running headers/footers are learned from a sample of pages before the first page is produced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType

import pymupdf

from pipelines.document import furniture
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
    ) -> None:
        self._opened = open_source(
            source, password=password, max_pages=max_pages, truncate=truncate, max_bytes=max_bytes
        )
        self.render_dpi = render_dpi
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
            if _looks_scanned(page, blocks):
                png = page.get_pixmap(dpi=self.render_dpi, alpha=False).tobytes("png")
                return Page(
                    number=number, width=width, height=height, text="", scanned=True, image_png=png, removed=removed
                )
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
        )


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
) -> PdfReader:
    """Open and validate (raising ``DocumentError``) without reading pages yet."""
    return PdfReader(
        source, password=password, max_pages=max_pages, truncate=truncate, max_bytes=max_bytes, render_dpi=render_dpi
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
) -> Iterator[Page]:
    """Pages one at a time (bounded memory). Validation errors are raised on the first ``next()``."""
    with open_pdf(
        source, password=password, max_pages=max_pages, truncate=truncate, max_bytes=max_bytes, render_dpi=render_dpi
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
) -> Document:
    """The whole document. ``truncate=True`` reads the first ``max_pages`` of a longer file instead of refusing it
    (``metadata["truncated"] == "true"``)."""
    with open_pdf(
        source, password=password, max_pages=max_pages, truncate=truncate, max_bytes=max_bytes, render_dpi=render_dpi
    ) as reader:
        return reader.document(on_page)
