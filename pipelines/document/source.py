"""Opening a PDF we are willing to read: size, format, password and page-count checks with typed errors.

Every refusal is a ``DocumentError`` with a code; no raw PyMuPDF exception gets out. Paths are hashed and opened
from disk in streaming fashion, so a large file is never held twice in memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pymupdf

from pipelines.document.types import DocumentError

Source = bytes | bytearray | memoryview | str | Path
_HEADER_WINDOW = 1024  # the PDF spec lets "%PDF-" start anywhere in the first 1 KiB
_TAIL_WINDOW = 2048  # "%%EOF" is expected near the end; its absence means the file was cut short


@dataclass
class OpenedPdf:
    doc: pymupdf.Document
    sha256: str
    pages_to_read: int
    total_pages: int
    title: str | None
    metadata: dict[str, str] = field(default_factory=dict)


def open_source(
    source: Source,
    *,
    password: str | None,
    max_pages: int | None,
    truncate: bool,
    max_bytes: int,
) -> OpenedPdf:
    doc, digest, cut_short = _open(source, max_bytes)
    try:
        return _validate(
            doc, digest, cut_short=cut_short, password=password, max_pages=max_pages, truncate=truncate
        )
    except BaseException:
        doc.close()
        raise


def _open(source: Source, max_bytes: int) -> tuple[pymupdf.Document, str, bool]:
    """The opened document, the SHA-256 of its bytes, and whether the file lacks its closing ``%%EOF``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_bytes:
            raise DocumentError(f"document is {len(data)} bytes, over the {max_bytes}-byte limit", "too_large")
        _check_header(data[:_HEADER_WINDOW])
        digest = hashlib.sha256(data).hexdigest()
        return _pymupdf_open(stream=data), digest, b"%%EOF" not in data[-_TAIL_WINDOW:]
    if isinstance(source, (str, Path)):
        path = Path(source)
        size = path.stat().st_size  # FileNotFoundError for a missing path: a caller bug, not a bad document
        if size > max_bytes:
            raise DocumentError(f"document is {size} bytes, over the {max_bytes}-byte limit", "too_large")
        h = hashlib.sha256()
        with path.open("rb") as f:
            head = f.read(_HEADER_WINDOW)
            _check_header(head)
            h.update(head)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            f.seek(max(0, size - _TAIL_WINDOW))
            tail = f.read()
        return _pymupdf_open(filename=str(path)), h.hexdigest(), b"%%EOF" not in tail
    raise TypeError(f"source must be bytes or a path, not {type(source).__name__}")


def _check_header(head: bytes) -> None:
    if not head:
        raise DocumentError("document is empty (0 bytes)", "not_pdf")
    if b"%PDF-" not in head:
        raise DocumentError("not a PDF: no %PDF- header", "not_pdf")


def _pymupdf_open(**kwargs: object) -> pymupdf.Document:
    shown = pymupdf.TOOLS.mupdf_display_errors()
    pymupdf.TOOLS.mupdf_display_errors(False)  # a damaged file is an answer here, not stderr noise
    try:
        doc = pymupdf.open(filetype="pdf", **kwargs)
    except Exception as exc:  # noqa: BLE001 - MuPDF raises several types for unreadable files
        raise DocumentError(f"PDF cannot be opened: {exc}", "corrupt") from None
    finally:
        pymupdf.TOOLS.mupdf_display_errors(bool(shown))
    if not doc.is_pdf:
        doc.close()
        raise DocumentError("not a PDF", "not_pdf")
    return doc


def _validate(
    doc: pymupdf.Document,
    digest: str,
    *,
    cut_short: bool,
    password: str | None,
    max_pages: int | None,
    truncate: bool,
) -> OpenedPdf:
    """Password, page count and limits. A file MuPDF had to repair is accepted (sloppy producers are common)
    unless it is also cut short: then pages silently come back empty, so it is refused as ``corrupt``."""
    try:
        if doc.needs_pass:
            if password is None:
                raise DocumentError("PDF is encrypted and no password was given", "encrypted")
            if not doc.authenticate(password):
                raise DocumentError("wrong password for encrypted PDF", "encrypted")
        total = doc.page_count
        raw_meta = doc.metadata or {}
        repaired = bool(doc.is_repaired)
    except DocumentError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DocumentError(f"PDF cannot be read: {exc}", "corrupt") from None
    if repaired and cut_short:
        raise DocumentError("PDF is truncated (no %%EOF; MuPDF had to reconstruct it)", "corrupt")
    if total == 0:
        if repaired:
            raise DocumentError("PDF is damaged: no pages could be recovered", "corrupt")
        raise DocumentError("PDF has no pages", "empty")
    metadata = {k: str(v) for k, v in raw_meta.items() if v}
    metadata["page_count_total"] = str(total)
    if repaired:
        metadata["repaired"] = "true"
    to_read = total
    if max_pages is not None and total > max_pages:
        if not truncate:
            raise DocumentError(f"PDF has {total} pages, over the {max_pages}-page limit", "too_many_pages")
        to_read = max_pages
        metadata["truncated"] = "true"
    title = (raw_meta.get("title") or "").strip() or None
    return OpenedPdf(doc=doc, sha256=digest, pages_to_read=to_read, total_pages=total, title=title, metadata=metadata)
