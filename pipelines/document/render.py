"""Office formats (Word, e-mail) -> a PDF rendering the PDF pipeline reads, so citations get pages and boxes and
the annotated output is that rendering with highlights.

The HTML handed to MuPDF's Story is built here from escaped text only (``html.escape`` on every piece of document
text), so document content can never become markup, and MuPDF's Story fetches nothing remote.  ``Anchor`` records
where each paragraph of the source came from ("paragraph 12", "message 2 / attachment terms.pdf, page 3") so a
verified quote can be traced back to it (:func:`anchor_for`).
"""

from __future__ import annotations

import html
import io
import re

import pymupdf
from pipelines.document.types import Anchor, DocumentError

CSS = """
body { font-family: sans-serif; font-size: 10pt; }
h1 { font-size: 15pt; } h2 { font-size: 13pt; } h3 { font-size: 11pt; }
p { margin-bottom: 5pt; }
.ins { color: #006000; text-decoration: underline; }
.del { color: #a00000; text-decoration: line-through; }
.note { color: #404090; font-style: italic; }
.meta { color: #505050; }
table { border-collapse: collapse; } td { border: 1px solid #888; padding: 2pt; }
"""
MAX_RENDER_PAGES = 2000


class HtmlDoc:
    """Accumulates escaped HTML and the anchors of its paragraphs."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.anchors: list[Anchor] = []

    def block(self, tag: str, inner_html: str, plain: str, label: str | None = None, cls: str | None = None) -> None:
        attr = f' class="{cls}"' if cls else ""
        self.parts.append(f"<{tag}{attr}>{inner_html}</{tag}>")
        if label and plain.strip():
            self.anchors.append(Anchor(label=label, text=plain))

    def text(self, tag: str, text: str, label: str | None = None, cls: str | None = None) -> None:
        self.block(tag, esc(text), text, label, cls)

    def table(self, rows: list[list[str]], label: str | None = None) -> None:
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        self.parts.append(f"<table>{body}</table>")
        if label:
            self.anchors.append(Anchor(label=label, text=" ".join(c for row in rows for c in row)))

    def html(self) -> str:
        return "<html><body>" + "".join(self.parts) + "</body></html>"


def esc(text: str) -> str:
    """Escaped text, control characters dropped (they are not text a PDF can carry)."""
    text = "".join(c for c in text if c in "\n\t" or ord(c) >= 32)
    return html.escape(text, quote=True).replace("\n", "<br/>")


def render_pdf(doc: HtmlDoc, *, title: str | None = None, max_pages: int = MAX_RENDER_PAGES) -> bytes:
    """Letter pages with 1-inch margins.  More than ``max_pages`` is ``DocumentError("too_many_pages")``."""
    story = pymupdf.Story(html=doc.html(), user_css=CSS)
    out = io.BytesIO()
    writer = pymupdf.DocumentWriter(out)
    mediabox = pymupdf.paper_rect("letter")
    where = mediabox + (72, 72, -72, -72)
    more, pages = 1, 0
    while more:
        pages += 1
        if pages > max_pages:
            writer.close()
            raise DocumentError(f"the rendering exceeds {max_pages} pages", "too_many_pages")
        device = writer.begin_page(mediabox)
        more, _ = story.place(where)
        story.draw(device)
        writer.end_page()
    writer.close()
    data = out.getvalue()
    if title:
        pdf = pymupdf.open(stream=data, filetype="pdf")
        pdf.set_metadata({"title": title[:300]})
        data = pdf.tobytes()
        pdf.close()
    return data


_SPACE = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _SPACE.sub(" ", text).strip().casefold()


def anchor_for(anchors: list[Anchor], quote: str) -> str | None:
    """The label of the paragraph a (verified, source-text) quote starts in, or None."""
    q = _norm(quote)
    if not q:
        return None
    for probe in (q, q[:60], q[:25]):
        for anchor in anchors:
            if probe in _norm(anchor.text):
                return anchor.label
    return None
