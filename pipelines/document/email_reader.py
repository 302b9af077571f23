"""E-mail (.eml) -> one document: every message of the thread (the top message and the messages forwarded or
attached in it) in time order, each with its headers, its body, and its attachments read by the reader that fits
them (PDF, Word, nested e-mail; other types are listed, not read).

HTML bodies become text with the standard library's ``html.parser``: tags are dropped, ``script``/``style`` content
is discarded, nothing is fetched (remote images, CSS and links stay text at most).  Bounds, each a
``DocumentError``: nesting deeper than ``max_depth`` (``too_deep``), an attachment over ``max_attachment_bytes`` or
more than ``max_parts`` MIME parts (``too_large``).  Anchors name the message and the attachment, so a citation
says "message 2 / attachment terms.pdf, page 3".
"""

from __future__ import annotations

import email
import email.policy
from datetime import datetime, timezone
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser

from pipelines.document.render import HtmlDoc, esc
from pipelines.document.types import DocumentError

DEFAULT_MAX_DEPTH = 5
DEFAULT_MAX_PARTS = 500
DEFAULT_MAX_ATTACHMENT = 50 * 2**20
_BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "blockquote",
           "pre", "hr", "section", "article", "header", "footer"}


class _HtmlText(HTMLParser):
    """Visible text of an HTML body; script, style and other non-content elements are dropped."""

    _SKIP = {"script", "style", "head", "title", "noscript", "template", "iframe", "object", "svg"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self.skipping += 1
        elif tag in _BLOCKS:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in _BLOCKS:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.out.append(data)


def html_to_text(markup: str) -> str:
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.out).splitlines())
    text, blank = [], False
    for line in lines:
        if line:
            text.append(line)
            blank = False
        elif not blank and text:
            text.append("")
            blank = True
    return "\n".join(text).strip()


class _Message:
    def __init__(self, msg: EmailMessage, depth: int) -> None:
        self.msg = msg
        self.depth = depth
        self.body = ""
        self.attachments: list[tuple[str, bytes]] = []
        try:
            self.date = parsedate_to_datetime(str(msg.get("Date", "")))
            if self.date.tzinfo is None:
                self.date = self.date.replace(tzinfo=timezone.utc)
        except (TypeError, ValueError, IndexError):
            self.date = None


def _collect(msg: EmailMessage, depth: int, out: list[_Message], counts: list[int], *, max_depth: int,
             max_parts: int, max_attachment: int) -> None:
    if depth > max_depth:
        raise DocumentError(f"e-mail nested more than {max_depth} levels deep", "too_deep")
    current = _Message(msg, depth)
    out.append(current)
    plain: list[str] = []
    html: list[str] = []
    nested = {id(p) for p in _nested_parts(msg)}
    for part in msg.walk() if msg.is_multipart() else [msg]:
        if id(part) in nested:
            continue  # parts of a nested message belong to that message
        counts[0] += 1
        if counts[0] > max_parts:
            raise DocumentError(f"e-mail has more than {max_parts} MIME parts", "too_large")
        ctype = part.get_content_type()
        if part.is_multipart() and ctype != "message/rfc822":
            continue
        if ctype == "message/rfc822":
            payload = part.get_payload()
            inner = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(inner, EmailMessage):
                _collect(inner, depth + 1, out, counts, max_depth=max_depth, max_parts=max_parts,
                         max_attachment=max_attachment)
            continue
        disposition = part.get_content_disposition()
        if disposition != "attachment" and ctype in ("text/plain", "text/html") and not part.get_filename():
            try:
                content = part.get_content()
            except (LookupError, ValueError):
                content = part.get_payload(decode=True).decode("utf-8", "replace")  # type: ignore[union-attr]
            (plain if ctype == "text/plain" else html).append(str(content))
            continue
        data = part.get_payload(decode=True) or b""
        if len(data) > max_attachment:
            raise DocumentError(f"attachment {part.get_filename() or ctype!r} is {len(data)} bytes, over the "
                                f"limit of {max_attachment}", "too_large")
        current.attachments.append((part.get_filename() or f"attachment.{ctype.split('/')[-1]}", data))
    current.body = "\n\n".join(plain) if plain else "\n\n".join(html_to_text(h) for h in html)


def _nested_parts(msg: EmailMessage) -> list[EmailMessage]:
    nested = []
    for part in msg.walk():
        if part.get_content_type() == "message/rfc822":
            for inner in part.get_payload() or []:
                if isinstance(inner, EmailMessage):
                    nested.extend(inner.walk())
    return nested


def email_to_html(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH, max_parts: int = DEFAULT_MAX_PARTS,
                  max_attachment_bytes: int = DEFAULT_MAX_ATTACHMENT) -> tuple[HtmlDoc, str | None]:
    """The thread's rendering (oldest message first) and its subject."""
    try:
        top = email.message_from_bytes(data, policy=email.policy.default)
    except Exception as exc:  # noqa: BLE001 - the parser is lenient; anything raised means unreadable
        raise DocumentError(f"the e-mail cannot be parsed: {exc}", "corrupt") from None
    if not isinstance(top, EmailMessage) or not (top.get("From") or top.get("Subject") or top.get("Date")):
        raise DocumentError("not an e-mail: no From, Subject or Date header", "corrupt")
    messages: list[_Message] = []
    try:
        _collect(top, 0, messages, [0], max_depth=max_depth, max_parts=max_parts,
                 max_attachment=max_attachment_bytes)
    except RecursionError:
        raise DocumentError(f"e-mail nested more than {max_depth} levels deep", "too_deep") from None
    earliest = datetime.min.replace(tzinfo=timezone.utc)
    messages.sort(key=lambda m: (m.date or earliest))
    out = HtmlDoc()
    for k, m in enumerate(messages, 1):
        label = f"message {k}"
        subject = str(m.msg.get("Subject", "") or "(no subject)")
        out.text("h2", f"Message {k}: {subject}", label=f"{label} header")
        for name in ("From", "To", "Cc", "Date"):
            if m.msg.get(name):
                out.text("p", f"{name}: {m.msg.get(name)}", label=f"{label} header", cls="meta")
        for para in [p for p in m.body.split("\n\n") if p.strip()] or ["(no text body)"]:
            out.text("p", para, label=f"{label} body")
        for name, payload in m.attachments:
            _attachment(out, f"{label} / attachment {name}", name, payload)
    return out, str(top.get("Subject", "")).strip() or None


def _attachment(out: HtmlDoc, label: str, name: str, data: bytes) -> None:
    head = data[:1024]
    kind = "pdf" if b"%PDF-" in head else "docx" if head.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0")) else ""
    out.text("h3", f"Attachment: {name}", label=label)
    if kind == "pdf":
        from pipelines.document.reader import read_pdf

        document = read_pdf(data)
        for page in document.pages:
            for para in [p for p in page.text.split("\n\n") if p.strip()]:
                para = para if para.lstrip().startswith("|") else " ".join(para.split())  # keep tables' rows
                out.text("p", para, label=f"{label}, page {page.number}")
            if page.scanned and not page.text:
                out.text("p", f"[page {page.number} is a scanned image without text]", cls="note")
    elif kind == "docx":
        from pipelines.document.docx_reader import docx_to_html

        inner, _ = docx_to_html(data)
        out.parts.extend(inner.parts)
        out.anchors.extend(a.model_copy(update={"label": f"{label}, {a.label}"}) for a in inner.anchors)
    elif data.startswith(_IMAGE_SIGNATURES):
        _image_attachment(out, label, name, data)
    elif name.lower().endswith((".txt", ".csv", ".md")):
        for para in [p for p in data.decode("utf-8", "replace").split("\n\n") if p.strip()]:
            out.text("p", para, label=label)
    else:
        out.block("p", esc(f"[attachment {name} ({len(data)} bytes) is not a document this reader takes]"),
                  "", cls="note")


_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"II*\x00", b"MM\x00*")
MAX_IMAGE_PIXELS = 50_000_000


def _image_attachment(out: HtmlDoc, label: str, name: str, data: bytes) -> None:
    """A scanned page sent as a picture: OCR'd like a scanned PDF page (when Tesseract's data is installed)."""
    import pymupdf

    from pipelines.document.reader import read_pdf

    try:
        image = pymupdf.Pixmap(data)
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise DocumentError(f"image attachment {name!r} is {image.width}x{image.height} pixels, over the "
                                f"limit of {MAX_IMAGE_PIXELS}", "too_large")
        pdf = pymupdf.open()
        page = pdf.new_page(width=image.width * 72 / 150, height=image.height * 72 / 150)
        page.insert_image(page.rect, stream=data)
        document = read_pdf(pdf.tobytes(), ocr=True)
        pdf.close()
    except DocumentError as exc:
        if exc.code != "ocr_unavailable":
            raise
        out.text("p", f"[image attachment {name}: not read (no OCR language data installed)]", cls="note")
        return
    except Exception as exc:  # noqa: BLE001 - an undecodable picture is noted, not fatal to the e-mail
        out.text("p", f"[image attachment {name}: cannot be decoded ({type(exc).__name__})]", cls="note")
        return
    text = document.pages[0].text if document.pages else ""
    for para in [p for p in text.split("\n\n") if p.strip()] or ["(no text recognised)"]:
        out.text("p", " ".join(para.split()), label=f"{label} (OCR)")
