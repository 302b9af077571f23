"""Synthetic contract PDFs with known answers, and deliberately bad PDFs, for testing the reader and the agents.

``make_contract`` lays out a commercial contract page by page (title, parties, numbered sections, running header,
"Page N of M" footer, filler prose) and places clauses of known CUAD categories on known pages, returning the PDF
with its gold annotations. One page is a ruled fee table, one is set in two columns, and some can be scanned
(rendered to an image, no text layer). Everything is deterministic per seed and generated offline.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Final

import pymupdf
from pydantic import BaseModel, ConfigDict, Field

from pipelines.document import synthetic_text as wording
from pipelines.document.types import GoldClause, Section

AUTO: Final = -1  # "pick a sensible page" for table_page / two_column_page

_W, _H = 612.0, 792.0  # US Letter
_X0, _X1, _TOP, _BOTTOM = 72.0, 540.0, 72.0, 718.0
_BODY, _BODY_SIZE, _BOLD, _HEAD_SIZE = "tiro", 10.0, "tibo", 10.5
_GAP = 8.0
_PER_PAGE = 5  # clauses that fit on an ordinary page next to its heading and some prose
_SCAN_DPI = 100
_META_DATE = "D:20240101000000Z"


class SyntheticContract(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    pdf: bytes = Field(repr=False)
    gold: list[GoldClause]
    page_count: int
    title: str
    parties: list[str]
    seed: int
    sections: list[Section] = Field(default_factory=list, description="headings as laid out, scanned pages included")
    clause_sections: dict[str, str] = Field(default_factory=dict, description="category -> section number")
    scanned_pages: list[int] = Field(default_factory=list)
    table_page: int | None = None
    table_rows: list[list[str]] = Field(default_factory=list)
    two_column_page: int | None = None
    left_column: list[str] = Field(default_factory=list, description="paragraphs of the left column")
    right_column: list[str] = Field(default_factory=list, description="paragraphs of the right column")
    header: str = ""
    footer_template: str = "Page {n} of {total}"

    def gold_for(self, category: str) -> list[GoldClause]:
        return [g for g in self.gold if g.category == category]


# ---------------------------------------------------------------------------------------------- layout helper


class _Flow:
    """Writes paragraphs down a column, refusing (and writing nothing) when one does not fit."""

    def __init__(self, page: pymupdf.Page, x0: float, x1: float, top: float, bottom: float) -> None:
        self.page, self.x0, self.x1, self.y, self.bottom = page, x0, x1, top, bottom

    def para(
        self, text: str, *, font: str = _BODY, size: float = _BODY_SIZE, gap: float = _GAP, align: int = 0
    ) -> bool:
        if self.bottom - self.y < size * 1.5:
            return False
        rect = pymupdf.Rect(self.x0, self.y, self.x1, self.bottom)
        rc = self.page.insert_textbox(rect, text, fontname=font, fontsize=size, align=align)
        if rc < 0:
            return False
        self.y += rect.height - rc + gap
        return True

    def need(self, texts: list[tuple[str, str, float]]) -> float:
        """Height the given (text, font, size) paragraphs would take in this column."""
        return sum(_measure(t, f, s, self.x1 - self.x0) + _GAP for t, f, s in texts)

    def room(self) -> float:
        return self.bottom - self.y


def _measure(text: str, font: str, size: float, width: float) -> float:
    doc = pymupdf.open()
    page = doc.new_page(width=width + 10, height=2000)
    rc = page.insert_textbox(pymupdf.Rect(0, 0, width, 2000), text, fontname=font, fontsize=size)
    doc.close()
    return 2000 - rc


# ---------------------------------------------------------------------------------------------- the contract


class _Builder:
    def __init__(self, pages: int, seed: int, categories: list[str]) -> None:
        self.n = pages
        self.seed = seed
        self.rng = random.Random(seed)
        self.facts = wording.draw_facts(self.rng)
        self.doc = pymupdf.open()
        self.gold: list[GoldClause] = []
        self.sections: list[Section] = []
        self.clause_sections: dict[str, str] = {}
        self.section_no = 0
        self.clauses = {c: wording.clause(c, self.facts, self.rng) for c in categories}
        self.header = f"{self.facts.short_title} | {self.facts.party_a} and {self.facts.party_b} | Confidential"
        self.table_rows: list[list[str]] = []
        self.left: list[str] = []
        self.right: list[str] = []

    # -- page furniture and headings
    def furniture(self, page: pymupdf.Page, number: int) -> None:
        # footer first: the reader must not depend on content-stream order
        page.insert_text((_W / 2 - 30, _H - 36), f"Page {number} of {self.n}", fontname="helv", fontsize=8)
        page.insert_text((_X0, _H - 36), f"Ref. {self.facts.ref}", fontname="helv", fontsize=7)
        page.insert_text((_X0, 44), self.header, fontname="helv", fontsize=8)

    def section(self, flow: _Flow, title: str, page: int) -> str:
        self.section_no += 1
        number = str(self.section_no)
        self.sections.append(Section(number=number, title=title, page=page, level=1))
        if not flow.para(f"{number}. {title}", font=_BOLD, size=_HEAD_SIZE):
            raise ValueError(f"page {page} has no room for section {number}")
        return number

    def clause_item(self, flow: _Flow, parent: str, sub: int, category: str, page: int, run_in: bool) -> bool:
        heading, text = self.clauses[category]
        number = f"{parent}.{sub}"
        if run_in:
            parts = [(f"{number} {heading}. {text}", _BODY, _BODY_SIZE)]
        else:
            parts = [(f"{number} {heading}", _BOLD, _BODY_SIZE), (text, _BODY, _BODY_SIZE)]
        if flow.need(parts) > flow.room():
            return False
        for t, f, s in parts:
            flow.para(t, font=f, size=s)
        self.sections.append(Section(number=number, title=heading, page=page, level=2))
        self.gold.append(GoldClause(category=category, text=text, page=page))
        self.clause_sections[category] = number
        return True

    def fill(self, flow: _Flow, min_sentences: int = 3) -> list[str]:
        written = []
        for _ in range(12):
            text = wording.filler_paragraph(self.facts, self.rng)
            if not flow.para(text):
                short = wording.filler_paragraph(self.facts, self.rng, (1, 2))
                if flow.para(short):
                    written.append(short)
                break
            written.append(text)
        return written

    # -- page kinds
    def first_page(self, page: pymupdf.Page) -> None:
        f = self.facts
        flow = _Flow(page, _X0, _X1, _TOP + 10, _BOTTOM)
        flow.para(f.title, font=_BOLD, size=16, align=pymupdf.TEXT_ALIGN_CENTER, gap=14)
        flow.para(wording.preamble(f))
        self.gold += [
            GoldClause(category="Document Name", text=f.title, page=1),
            GoldClause(category="Parties", text=f.party_a, page=1),
            GoldClause(category="Parties", text=f.party_b, page=1),
            GoldClause(category="Agreement Date", text=f.agreement_date, page=1),
        ]
        flow.para("RECITALS", font=_BOLD, size=_HEAD_SIZE)
        self.sections.append(Section(number=None, title="RECITALS", page=1, level=1))
        flow.para(
            f"WHEREAS, {f.a_role} is in the business of providing the products and services described herein; and"
        )
        flow.para(f"WHEREAS, {f.b_role} wishes to obtain such products and services on the terms of this Agreement;")
        flow.para(
            "NOW, THEREFORE, in consideration of the mutual covenants contained herein, the parties agree as follows:"
        )
        self.section(flow, "Definitions", 1)
        for d in wording.DEFINITIONS:
            if not flow.para(d):
                break

    def normal_page(self, page: pymupdf.Page, number: int, categories: list[str]) -> None:
        flow = _Flow(page, _X0, _X1, _TOP, _BOTTOM)
        title = wording.group_title(categories[0]) if categories else self.rng.choice(wording.GENERIC_SECTIONS)
        parent = self.section(flow, title, number)
        flow.para(wording.filler_paragraph(self.facts, self.rng, (2, 3)))
        sub = 0
        for category in categories:
            sub += 1
            if not self.clause_item(flow, parent, sub, category, number, run_in=self.rng.random() < 0.3):
                raise ValueError(f"page {number} is too full for {category!r}: use more pages or fewer clauses")
        if not categories:
            sub += 1
            heading = self.rng.choice(wording.GENERIC_SUBSECTIONS)
            if flow.para(f"{parent}.{sub} {heading}", font=_BOLD):
                self.sections.append(Section(number=f"{parent}.{sub}", title=heading, page=number, level=2))
        self.fill(flow)

    def table_page(self, page: pymupdf.Page, number: int, categories: list[str]) -> None:
        flow = _Flow(page, _X0, _X1, _TOP, _BOTTOM)
        parent = self.section(flow, "Fees and Payment", number)
        flow.para(f"{self.facts.b_role} shall pay the fees set forth in the following fee schedule.")
        rows = [["Item", "Description", "Annual Fee"]]
        rows.append(["Platform Subscription", "Access to the hosted platform for all named users", self._fee()])
        rows.append(["Implementation", "One-time configuration and data migration services", self._fee()])
        if "Minimum Commitment" in categories:
            text = self.clauses["Minimum Commitment"][1]
            rows.append(["Minimum Commitment", text, self._fee()])
            self.gold.append(GoldClause(category="Minimum Commitment", text=text, page=number))
            self.clause_sections["Minimum Commitment"] = parent
        rows.append(["Premium Support", "Business-hours support with four-hour response time", self._fee()])
        flow.y = _draw_table(page, rows, flow.y, [_X0, _X0 + 130, _X0 + 380, _X1]) + _GAP * 2
        self.table_rows = rows
        sub = 0
        for category in [c for c in categories if c != "Minimum Commitment"]:
            sub += 1
            if not self.clause_item(flow, parent, sub, category, number, run_in=False):
                raise ValueError(f"page {number} is too full for {category!r}")
        self.fill(flow)

    def _fee(self) -> str:
        return f"${self.rng.randrange(10, 300) * 1000:,}"

    def two_column_page(self, page: pymupdf.Page, number: int, categories: list[str]) -> None:
        flow = _Flow(page, _X0, _X1, _TOP, _BOTTOM)
        title = wording.group_title(categories[0]) if categories else "Restrictive Covenants"
        parent = self.section(flow, title, number)
        mid, gutter = (_X0 + _X1) / 2, 12.0
        half = (len(categories) + 1) // 2
        # right column first: the reader must order by geometry, not by content stream
        columns = [("right", mid + gutter, _X1, categories[half:]), ("left", _X0, mid - gutter, categories[:half])]
        top = flow.y
        sub_of = {c: i + 1 for i, c in enumerate(categories)}
        for side, x0, x1, cats in columns:
            col = _Flow(page, x0, x1, top, _BOTTOM)
            texts: list[str] = []
            for category in cats:
                heading, text = self.clauses[category]
                sub = f"{parent}.{sub_of[category]}"
                head = f"{sub} {heading}"
                if not (col.para(head, font=_BOLD) and col.para(text)):
                    raise ValueError(f"two-column page {number} is too full for {category!r}")
                self.sections.append(Section(number=sub, title=heading, page=number, level=2))
                self.gold.append(GoldClause(category=category, text=text, page=number))
                self.clause_sections[category] = sub
                texts += [head, text]
            texts += self.fill(col)
            (self.right if side == "right" else self.left).extend(texts)
        # keep the section list in reading order (left column first)
        subs = [s for s in self.sections if s.page == number and s.level == 2]
        others = [s for s in self.sections if not (s.page == number and s.level == 2)]
        self.sections = others + sorted(subs, key=lambda s: int((s.number or "0").split(".")[-1]))

    def last_page(self, page: pymupdf.Page, number: int, categories: list[str]) -> None:
        flow = _Flow(page, _X0, _X1, _TOP, _BOTTOM)
        parent = self.section(flow, "Miscellaneous", number)
        for sub, category in enumerate(categories, 1):
            if not self.clause_item(flow, parent, sub, category, number, run_in=False):
                raise ValueError(f"last page is too full for {category!r}")
        flow.para(
            "IN WITNESS WHEREOF, the parties have caused this Agreement to be executed by their duly authorized "
            "representatives as of the date first written above.",
            gap=18,
        )
        for name, who in ((self.facts.party_a, "Chief Executive Officer"), (self.facts.party_b, "General Counsel")):
            flow.para(f"{name.upper()}\nBy: ______________________________\nTitle: {who}", gap=18)


def _draw_table(page: pymupdf.Page, rows: list[list[str]], top: float, xs: list[float]) -> float:
    """Ruled table: text first, then each row's cell borders at the row's measured height. Returns its bottom."""
    y = top
    pad = 3.0
    for r, row in enumerate(rows):
        font = _BOLD if r == 0 else _BODY
        height = max(_measure(c, font, 9, xs[j + 1] - xs[j] - 2 * pad) for j, c in enumerate(row)) + 2 * pad
        for j, cell in enumerate(row):
            rect = pymupdf.Rect(xs[j], y, xs[j + 1], y + height)
            page.insert_textbox(rect + (pad, pad, -pad, 0), cell, fontname=font, fontsize=9)
            page.draw_rect(rect, color=(0, 0, 0), width=0.6)
        y += height
    return y


def _default_pages(pages: int) -> tuple[int | None, int | None, list[int]]:
    table = max(2, round(pages * 0.15))
    two = max(3, round(pages * 0.3))
    scan = max(4, round(pages * 0.6))

    def ok(p: int) -> bool:
        return 2 <= p <= pages - 1

    scanned = [scan] if ok(scan) and scan not in (table, two) else []
    return (table if ok(table) else None, two if ok(two) else None, scanned)


def _assign(
    categories: list[str], content_pages: list[int], table: int | None, two: int | None, scanned: list[int]
) -> dict[int, list[str]]:
    """Which clause categories go on which page: thematic ones to the special pages, the rest spread evenly."""
    plan: dict[int, list[str]] = {p: [] for p in content_pages}
    todo = list(categories)

    def take(prefer: list[str], k: int) -> list[str]:
        got = [c for c in prefer if c in todo][:k]
        got += [c for c in todo if c not in got][: k - len(got)]
        for c in got:
            todo.remove(c)
        return got

    if table is not None:
        plan[table] = take(["Minimum Commitment", "Price Restrictions"], 2)
    if two is not None:
        plan[two] = take(["Non-Compete", "Exclusivity"], 2)
    for p in scanned:
        plan[p] = take(["Insurance"], 1)
    normal = [p for p in content_pages if p not in (table, two, *scanned)]
    if not normal and todo:
        raise ValueError("no page left for the remaining clauses: use more pages")
    for j, c in enumerate(todo):
        plan[normal[j * len(normal) // len(todo)]].append(c)
    return plan


def make_contract(
    pages: int = 60,
    *,
    seed: int = 0,
    scanned_pages: list[int] | None = None,
    table_page: int | None = AUTO,
    two_column_page: int | None = AUTO,
    clauses: list[str] | None = None,
) -> SyntheticContract:
    """A contract of ``pages`` pages with gold clauses on known pages.

    ``scanned_pages=None`` picks one page (``[]``: none); ``table_page``/``two_column_page`` default to a page
    chosen from ``pages`` (``None``: none). ``clauses`` are the body categories to place (default: all known);
    the preamble's Document Name, Parties and Agreement Date are always on page 1.
    """
    if pages < 2:
        raise ValueError("a contract needs at least 2 pages (preamble and signatures)")
    d_table, d_two, d_scan = _default_pages(pages)
    table = d_table if table_page == AUTO else table_page
    two = d_two if two_column_page == AUTO else two_column_page
    scanned = d_scan if scanned_pages is None else sorted(set(scanned_pages))
    specials = [p for p in (table, two, *scanned) if p is not None]
    if len(specials) != len(set(specials)) or any(not 2 <= p <= pages - 1 for p in specials):
        raise ValueError(f"special pages must be distinct and within 2..{pages - 1}: {specials}")
    if clauses is None:  # as many of the known categories as comfortably fit
        normal = pages - 2 - len(specials)
        capacity = _PER_PAGE * normal + 2 * (table is not None) + 2 * (two is not None) + len(scanned)
        categories = wording.CLAUSE_CATEGORIES[:capacity]
    else:
        categories = list(clauses)
    unknown = [c for c in categories if c not in wording.CLAUSE_CATEGORIES]
    if unknown:
        raise ValueError(f"no template for categories {unknown}; known: {wording.CLAUSE_CATEGORIES}")

    b = _Builder(pages, seed, categories)
    plan = _assign(categories, list(range(2, pages)), table, two, scanned)
    b.first_page(_new_page(b.doc))
    b.furniture(b.doc[-1], 1)
    for number in range(2, pages):
        if number in scanned:
            _scanned_page(b, number, plan[number])
            continue
        page = _new_page(b.doc)
        b.furniture(page, number)
        if number == table:
            b.table_page(page, number, plan[number])
        elif number == two:
            b.two_column_page(page, number, plan[number])
        else:
            b.normal_page(page, number, plan[number])
    last = _new_page(b.doc)
    b.furniture(last, pages)
    b.last_page(last, pages, [])

    b.doc.set_metadata(
        {
            "title": b.facts.short_title,
            "author": b.facts.party_a,
            "subject": "Synthetic contract for testing",
            "creator": "kimiray synthetic",
            "producer": "PyMuPDF",
            "creationDate": _META_DATE,
            "modDate": _META_DATE,
        }
    )
    pdf = b.doc.tobytes(garbage=3, deflate=True, no_new_id=True)
    b.doc.close()
    return SyntheticContract(
        pdf=pdf,
        gold=sorted(b.gold, key=lambda g: (g.page or 0)),
        page_count=pages,
        title=b.facts.title,
        parties=[b.facts.party_a, b.facts.party_b],
        seed=seed,
        sections=b.sections,
        clause_sections=b.clause_sections,
        scanned_pages=scanned,
        table_page=table,
        table_rows=b.table_rows,
        two_column_page=two,
        left_column=b.left,
        right_column=b.right,
        header=b.header,
    )


def _new_page(doc: pymupdf.Document) -> pymupdf.Page:
    return doc.new_page(width=_W, height=_H)


def _scanned_page(b: _Builder, number: int, categories: list[str]) -> None:
    """Lay the page out on a scratch document, rasterise it, and insert only the image."""
    scratch = pymupdf.open()
    page = _new_page(scratch)
    b.furniture(page, number)
    b.normal_page(page, number, categories)
    pix = page.get_pixmap(dpi=_SCAN_DPI, colorspace=pymupdf.csGRAY)
    png = pix.tobytes("png")
    scratch.close()
    target = _new_page(b.doc)
    target.insert_image(target.rect, stream=png)


# ---------------------------------------------------------------------------------------------- bad and long PDFs


def _raw_pdf(contents: list[bytes], *, width: int = 612, height: int = 792) -> bytes:
    """A minimal valid PDF written by hand (pages sharing one Helvetica font): fast for thousands of pages and
    able to express a document with zero pages, which PyMuPDF refuses to save."""
    n = len(contents)
    objs = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(n)) + b"] /Count %d >>" % n,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, stream in enumerate(contents):
        objs.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents %d 0 R >>" % (width, height, 5 + 2 * i)
        )
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def _pdf_string(text: str) -> bytes:
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return b"(" + escaped.encode("latin-1") + b")"


def _text_ops(items: list[tuple[float, float, float, str]]) -> bytes:
    """Content stream showing (x, y_from_top, size, text) lines in Helvetica."""
    return b"\n".join(
        b"BT /F1 %.1f Tf %.1f %.1f Td %s Tj ET" % (size, x, 792 - y, _pdf_string(text)) for x, y, size, text in items
    )


def make_long_pdf(pages: int = 2000, *, lines: int = 4) -> bytes:
    """A long text-only PDF (running header, "Page N of M" footer, a numbered section every 50 pages)."""
    contents = []
    for n in range(1, pages + 1):
        items = [(72.0, 40.0, 8.0, "Long Test Agreement | Confidential")]
        y = 100.0
        if n % 50 == 1:
            k = n // 50
            items.append((72.0, y, 11.0, f"{k + 1}. {wording.GENERIC_SECTIONS[k % len(wording.GENERIC_SECTIONS)]}"))
            y += 20
        for j in range(lines):
            items.append((72.0, y, 10.0, f"Body line {j + 1} of page {n}: the parties shall cooperate in good faith."))
            y += 14
        items.append((280.0, 760.0, 8.0, f"Page {n} of {pages}"))
        contents.append(_text_ops(items))
    return _raw_pdf(contents)


def _small_pdf() -> bytes:
    doc = pymupdf.open()
    for i in range(6):
        page = doc.new_page()
        page.insert_textbox(pymupdf.Rect(72, 72, 540, 720), wording.filler_paragraph(
            wording.draw_facts(random.Random(i)), random.Random(i), (20, 30)), fontname=_BODY, fontsize=10)
    data = doc.tobytes(garbage=3, deflate=True, no_new_id=True)
    doc.close()
    return data


def make_bad_pdfs(directory: str | Path, *, include_long: bool = False) -> dict[str, Path]:
    """Files the reader must refuse, keyed by the ``DocumentError.code`` they should produce:
    ``encrypted`` (user password "secret"), ``corrupt`` (truncated), ``empty`` (zero pages), ``not_pdf`` (a PNG
    named .pdf); ``include_long`` adds ``long`` (2,000 pages, for ``too_many_pages``)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    small = _small_pdf()
    files: dict[str, bytes] = {}
    doc = pymupdf.open(stream=small, filetype="pdf")
    files["encrypted"] = doc.tobytes(
        encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="secret", owner_pw="owner-secret", no_new_id=True
    )
    doc.close()
    files["corrupt"] = small[: len(small) // 3]
    files["empty"] = _raw_pdf([])
    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 32, 32), 0)
    pix.clear_with(200)
    files["not_pdf"] = pix.tobytes("png")
    if include_long:
        files["long"] = make_long_pdf()
    paths = {}
    for name, data in files.items():
        path = out / f"{name}.pdf"
        path.write_bytes(data)
        paths[name] = path
    return paths
