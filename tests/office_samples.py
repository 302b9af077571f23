"""Generated Word and e-mail test files: a contract .docx with headings, numbered clauses, a table, a header and
footer, tracked changes (raw w:ins / w:del, which python-docx cannot write itself) and a comment; e-mails with an
HTML body, nested messages and attachments."""

from __future__ import annotations

import io

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
