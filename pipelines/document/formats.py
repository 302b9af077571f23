"""Which reader a document's bytes need, and the PDF the rest of the pipeline reads.

A PDF is read as it is; a Word file and an e-mail are rendered to PDF first (``pipelines.document.render``), and
their ``anchors`` say which paragraph / message / attachment each piece of text came from.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from pipelines.document.render import render_pdf
from pipelines.document.types import Anchor, DocumentError


class Prepared(BaseModel):
    kind: str  # "pdf", "docx", "eml"
    pdf: bytes = Field(repr=False)
    anchors: list[Anchor] = Field(default_factory=list)
    title: str | None = None


def sniff(data: bytes, name: str = "") -> str:
    """"pdf", "docx", "eml" or "unknown" from the first bytes (and the file name for e-mail)."""
    head = data[:1024]
    if b"%PDF-" in head:
        return "pdf"
    if head.startswith(b"PK\x03\x04"):
        return "docx"
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        return "docx"  # an encrypted .docx (or an old .doc): the Word reader says which
    if name.lower().endswith(".eml") or _looks_like_email(head):
        return "eml"
    return "unknown"


_HEADER_NAMES = (b"from:", b"to:", b"subject:", b"date:", b"message-id:", b"mime-version:", b"received:",
                 b"return-path:", b"content-type:", b"delivered-to:", b"cc:", b"reply-to:")


def _looks_like_email(head: bytes) -> bool:
    lines = head.lower().splitlines()[:30]
    return sum(any(line.startswith(h) for h in _HEADER_NAMES) for line in lines) >= 2


def prepare(data: bytes, name: str = "", *, max_pages: int = 2000) -> Prepared:
    """The PDF to read; ``DocumentError`` for a file no reader takes (``not_pdf``, kept from the PDF-only days)
    or one a reader refuses."""
    kind = sniff(data, name)
    if kind == "pdf":
        return Prepared(kind="pdf", pdf=data)
    if kind == "docx":
        from pipelines.document.docx_reader import docx_to_html

        doc, title = docx_to_html(data)
        return Prepared(kind="docx", pdf=render_pdf(doc, title=title, max_pages=max_pages), anchors=doc.anchors,
                        title=title)
    if kind == "eml":
        from pipelines.document.email_reader import email_to_html

        doc, title = email_to_html(data)
        return Prepared(kind="eml", pdf=render_pdf(doc, title=title, max_pages=max_pages), anchors=doc.anchors,
                        title=title)
    if not data:
        raise DocumentError("the document is empty (0 bytes)", "empty")
    raise DocumentError("not a PDF, Word .docx or e-mail .eml file", "not_pdf")  # the code PDF-only callers know
