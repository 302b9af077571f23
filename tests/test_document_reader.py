"""PDF reader: layout, tables, furniture, structure, scanned pages, errors and memory, on synthetic contracts."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pymupdf
import pytest

from pipelines.document import Document, DocumentError, iter_pages, open_pdf, read_pdf
from pipelines.document.layout import Line
from pipelines.document.structure import match_heading
from pipelines.document.synthetic import SyntheticContract, make_bad_pdfs, make_contract

ROOT = Path(__file__).resolve().parents[1]


def norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def contract() -> SyntheticContract:
    return make_contract(60, seed=0)


@pytest.fixture(scope="module")
def doc(contract: SyntheticContract) -> Document:
    return read_pdf(contract.pdf)


def _special(contract: SyntheticContract) -> set[int]:
    return {contract.table_page, contract.two_column_page, *contract.scanned_pages, contract.page_count}


def test_document_identity(contract: SyntheticContract, doc: Document, tmp_path: Path) -> None:
    assert doc.page_count == contract.page_count == len(doc.pages)
    assert [p.number for p in doc.pages] == list(range(1, contract.page_count + 1))
    assert doc.sha256 == hashlib.sha256(contract.pdf).hexdigest()
    assert doc.title == contract.title.title()
    assert doc.metadata["author"] == contract.parties[0]
    path = tmp_path / "c.pdf"
    path.write_bytes(contract.pdf)
    from_path = read_pdf(path)
    assert from_path.sha256 == doc.sha256
    assert [p.text for p in from_path.pages] == [p.text for p in doc.pages]


def test_two_column_reading_order(contract: SyntheticContract, doc: Document) -> None:
    page = doc.pages[contract.two_column_page - 1]
    assert page.columns == 2
    text = norm(page.text)
    left = [text.index(norm(t)) for t in contract.left_column]
    right = [text.index(norm(t)) for t in contract.right_column]
    assert left == sorted(left) and right == sorted(right)
    assert max(left) < min(right)  # the whole left column before the right one (which the PDF draws first)
    # the right column starts higher on the page than the left column ends: a plain y-sort would interleave
    first_right = next(b for b in page.blocks if norm(b.text) == norm(contract.right_column[0]))
    last_left = next(b for b in page.blocks if norm(contract.left_column[-1]) in norm(b.text))
    assert first_right.bbox[1] < last_left.bbox[1]
    for p in doc.pages:
        if p.number not in _special(contract):
            assert p.columns == 1, p.number


def test_table_extracted_once(contract: SyntheticContract, doc: Document) -> None:
    page = doc.pages[contract.table_page - 1]
    assert len(page.tables) == 1
    table = page.tables[0]
    assert table.rows == contract.table_rows
    assert table.page == page.number
    table_blocks = [b for b in page.blocks if b.kind == "table"]
    assert len(table_blocks) == 1 and table_blocks[0].text == table.markdown
    assert table.markdown.splitlines()[0] == "| Item | Description | Annual Fee |"
    assert table.markdown.splitlines()[1] == "| --- | --- | --- |"
    for row in contract.table_rows:
        for cell in row:
            assert page.text.count(cell) == 1, cell  # only in the Markdown, not again as loose text
    # in reading order: after the intro sentence, before the text under the table
    kinds = [b.kind for b in page.blocks]
    assert 0 < kinds.index("table") < len(kinds) - 1
    assert all(not p.tables for p in doc.pages if p.number != contract.table_page)


def test_headers_and_footers_removed(contract: SyntheticContract, doc: Document) -> None:
    for page in doc.pages:
        assert not re.search(r"Page \d+ of \d+", page.text), page.number
        assert contract.header not in page.text
        assert "Ref. " not in page.text
        if page.scanned:
            continue
        assert f"Page {page.number} of {contract.page_count}" in page.removed
        assert contract.header in page.removed
        assert len(page.text) > 300  # the body stays
    assert norm(contract.title) in norm(doc.pages[0].text)


def test_sections_and_block_assignment(contract: SyntheticContract, doc: Document) -> None:
    expected = [(s.number, s.title, s.page, s.level) for s in contract.sections if s.page not in contract.scanned_pages]
    assert [(s.number, s.title, s.page, s.level) for s in doc.sections] == expected
    by_number = {s.number: s for s in doc.sections}
    assert by_number["1"].title == "Definitions" and by_number["1"].page == 1
    for gold in contract.gold:
        if gold.category not in contract.clause_sections or gold.page in contract.scanned_pages:
            continue
        page = doc.pages[gold.page - 1]
        block = next(b for b in page.blocks if norm(gold.text) in norm(b.text))
        assert block.section == contract.clause_sections[gold.category], gold.category
    headings = [b for p in doc.pages for b in p.blocks if b.kind == "heading"]
    assert any(b.text == "1. Definitions" for b in headings)
    assert all(b.section is not None for p in doc.pages[1:] for b in p.blocks)


def test_scanned_page(contract: SyntheticContract, doc: Document) -> None:
    assert contract.scanned_pages
    for page in doc.pages:
        if page.number in contract.scanned_pages:
            assert page.scanned and page.text == "" and not page.blocks
            assert page.image_png is not None and page.image_png.startswith(b"\x89PNG")
            pix = pymupdf.Pixmap(page.image_png)
            assert abs(pix.width - round(page.width * 110 / 72)) <= 2
        else:
            assert not page.scanned and page.image_png is None


def test_gold_clauses_on_their_pages(contract: SyntheticContract, doc: Document) -> None:
    categories = {g.category for g in contract.gold}
    assert {"Governing Law", "Minimum Commitment", "Insurance", "Parties", "Cap on Liability"} <= categories
    for gold in contract.gold:
        if gold.page in contract.scanned_pages:
            continue
        assert norm(gold.text) in norm(doc.pages[gold.page - 1].text), (gold.category, gold.page)


def test_block_spans(doc: Document) -> None:
    for page in doc.pages:
        assert page.text == "\n\n".join(b.text for b in page.blocks)
        for b in page.blocks:
            assert b.page == page.number
            assert page.text[b.char_start : b.char_end] == b.text
            x0, y0, x1, y1 = b.bbox
            assert 0 <= x0 <= x1 <= page.width and 0 <= y0 <= y1 <= page.height


def test_on_page_progress(contract: SyntheticContract) -> None:
    calls: list[tuple[int, int]] = []
    read_pdf(contract.pdf, on_page=lambda done, total: calls.append((done, total)))
    assert calls == [(i, contract.page_count) for i in range(1, contract.page_count + 1)]


def test_iter_pages_is_lazy(contract: SyntheticContract) -> None:
    pages = iter_pages(contract.pdf)
    first = next(pages)
    assert first.number == 1
    pages.close()
    with open_pdf(contract.pdf) as reader:
        assert reader.page_count == contract.page_count
        assert [p.number for p in reader.pages()] == list(range(1, contract.page_count + 1))
        assert reader.sections


def test_max_pages_and_truncate(contract: SyntheticContract) -> None:
    with pytest.raises(DocumentError) as err:
        read_pdf(contract.pdf, max_pages=5)
    assert err.value.code == "too_many_pages"
    short = read_pdf(contract.pdf, max_pages=5, truncate=True)
    assert short.page_count == len(short.pages) == 5
    assert short.metadata["truncated"] == "true" and short.metadata["page_count_total"] == str(contract.page_count)
    assert "truncated" not in read_pdf(contract.pdf, max_pages=60).metadata


def test_too_large(contract: SyntheticContract, tmp_path: Path) -> None:
    path = tmp_path / "big.pdf"
    path.write_bytes(contract.pdf)
    for source in (contract.pdf, path):
        with pytest.raises(DocumentError) as err:
            read_pdf(source, max_bytes=1000)
        assert err.value.code == "too_large"


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_bad_pdfs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("code", ["encrypted", "corrupt", "empty", "not_pdf"])
def test_bad_pdfs(bad: dict[str, Path], code: str) -> None:
    for source in (bad[code], bad[code].read_bytes()):
        with pytest.raises(DocumentError) as err:
            read_pdf(source)
        assert err.value.code == code, err.value.message
        with pytest.raises(DocumentError):
            next(iter_pages(source))


def test_encrypted_passwords(bad: dict[str, Path]) -> None:
    with pytest.raises(DocumentError) as err:
        read_pdf(bad["encrypted"], password="wrong")
    assert err.value.code == "encrypted"
    opened = read_pdf(bad["encrypted"], password="secret")
    assert opened.page_count == 6 and len(opened.pages[0].text) > 100


def test_not_a_pdf_bytes() -> None:
    for data in (b"", b"hello world", b"<html><body>" + b"x" * 2000 + b"%PDF-1.7</body></html>"):
        with pytest.raises(DocumentError) as err:
            read_pdf(data)
        assert err.value.code == "not_pdf"
    with pytest.raises(DocumentError) as err:
        read_pdf(b"%PDF-1.7\n" + b"\x00garbage" * 50)
    assert err.value.code == "corrupt"


def _article_pdf() -> bytes:
    doc = pymupdf.open()
    lines = [
        (50, "ARTICLE IV - INDEMNIFICATION", "tibo"),  # base14 fonts have no en dash
        (75, "Each party shall indemnify the other against third-party claims arising from its breach.", "tiro"),
        (105, "Section 5. Governing Law", "tibo"),
        (130, "This Agreement shall be governed by the laws of the State of Delaware.", "tiro"),
        (160, "12.3 Termination for Convenience", "tibo"),
        (185, "Either party may terminate this Agreement upon thirty days notice.", "tiro"),
        (215, "7.2 Audit Rights. Customer may audit the records of Provider once per year.", "tiro"),
        (245, "10 Main Street", "tiro"),
        (270, "1. The Customer shall pay all fees within thirty days of the invoice date.", "tiro"),
    ]
    page = doc.new_page()
    for y, text, font in lines:
        page.insert_text((72, 72 + y), text, fontname=font, fontsize=10)
    data = doc.tobytes()
    doc.close()
    return data


def test_heading_styles() -> None:
    d = read_pdf(_article_pdf())
    assert [(s.number, s.title, s.level) for s in d.sections] == [
        ("IV", "INDEMNIFICATION", 1),
        ("5", "Governing Law", 2),
        ("12.3", "Termination for Convenience", 3),
        ("7.2", "Audit Rights", 3),
    ]
    blocks = {b.text.split("\n")[0][:14]: b for b in d.pages[0].blocks}
    assert blocks["ARTICLE IV - I"].kind == "heading"
    assert blocks["7.2 Audit Righ"].kind == "text" and blocks["7.2 Audit Righ"].section == "7.2"
    assert blocks["10 Main Street"].kind == "text"


@pytest.mark.parametrize(
    ("text", "bold", "expected"),
    [
        ("1. Definitions", False, ("1", "Definitions", 1)),
        ("12.3 Termination for Convenience", False, ("12.3", "Termination for Convenience", 2)),
        ("ARTICLE IV – INDEMNIFICATION", False, ("IV", "INDEMNIFICATION", 1)),
        ("Section 5. Governing Law", False, ("5", "Governing Law", 1)),
        ("EXHIBIT A - Fee Schedule", False, ("Exhibit A", "Fee Schedule", 1)),
        ("3 CONFIDENTIALITY", False, ("3", "CONFIDENTIALITY", 1)),
        ("4 Payment Terms", True, ("4", "Payment Terms", 1)),
        ("10 Main Street", False, None),
        ("1. The Customer shall pay all fees within thirty days.", False, None),
        ("3.5 million shares of common stock were issued", False, None),
        ("Section 5.2 shall survive any termination of this Agreement.", False, None),
        ("Article 5 of the Convention provides otherwise", False, None),
    ],
)
def test_match_heading(text: str, bold: bool, expected: tuple[str, str, int] | None) -> None:
    h = match_heading(Line(bbox=(0, 0, 100, 10), text=text, bold=bold))
    assert (None if h is None else (h.number, h.title, h.level)) == expected


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    from pipelines.document import iter_pages, read_pdf
    from pipelines.document.synthetic import make_long_pdf

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    pdf = make_long_pdf(2000)
    base_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = rss_mb()
    seen, at200 = 0, None
    t = time.perf_counter()
    for page in iter_pages(pdf):
        seen += 1
        if seen == 200:
            at200 = rss_mb()
    iter_s = time.perf_counter() - t
    streaming_growth = rss_mb() - at200
    calls = []
    t = time.perf_counter()
    doc = read_pdf(pdf, on_page=lambda d, n: calls.append(d))
    read_s = time.perf_counter() - t
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_peak
    print(json.dumps(dict(pages=doc.page_count, seen=seen, calls=len(calls), iter_s=iter_s, read_s=read_s,
                          streaming_growth_mb=streaming_growth, peak_growth_mb=peak_growth, start_mb=start,
                          sections=len(doc.sections), removed=doc.pages[-1].removed, text=doc.pages[-1].text)))
    """
)


def test_long_pdf_bounded_memory() -> None:
    """2,000 pages in a fresh process, so peak RSS is this read's own."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["pages"] == r["seen"] == r["calls"] == 2000
    assert r["streaming_growth_mb"] < 30, r  # iterating without keeping pages: flat
    assert r["peak_growth_mb"] < 300, r  # holding the whole Document
    assert r["read_s"] < 30 and r["iter_s"] < 30, r
    assert r["sections"] == 40
    assert r["removed"] == ["Long Test Agreement | Confidential", "Page 2000 of 2000"]
    assert "Page 2000" not in r["text"] and "Body line 4 of page 2000" in r["text"]
