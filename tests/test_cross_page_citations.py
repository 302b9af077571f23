"""Clauses that run over a page break: one citation with a page range and parts on every page, through the real
reader (running header, page numbers, a footnote marker between the parts), annotated on every page; and facts
changed at the seam, or anywhere in a fuzzy window, never verify."""

from __future__ import annotations

import pymupdf
import pytest

from pipelines.document.annotate import AnnotatedItem, annotate_pdf
from pipelines.document.citations import find_quote, verify
from pipelines.document.reader import read_pdf
from pipelines.document.report import ContractResult, ExtractedValue, FieldResult, markdown_summary
from pipelines.document.types import Document, Page

CLAUSE_HEAD = ("12.6 Assignment. Neither this Agreement, nor any of the rights, interests or obligations under this "
               "Agreement may be assigned or delegated, in whole or in part, by operation of law or otherwise, by any "
               "party without the prior written consent of the other party, and any such assignment without such "
               "prior written consent shall be null and void; provided, however, that this Agreement may be "
               "assigned by a Party in connection with a Change in Control of such party, subject to the rights set "
               "forth in the Strategic")
CLAUSE_TAIL = ("Alliance Agreement upon such Change in Control; provided, further, that Siemens may assign its rights "
               "under this Agreement to any Distributor that agrees in writing to be bound by its terms.")
FILLER = ("The parties acknowledge that the recitals above form an integral part of this Agreement and that each "
          "of them had the opportunity to review it with counsel of its own choosing before signing it.")


def _page(doc: pymupdf.Document, number: int, body: list[str], *, marker: bool = False) -> None:
    """A page in the layout of an SEC filing printed from HTML: a running header, the body, then (mid-sheet, right
    under the text) a legend on some pages and the page number."""
    page = doc.new_page(width=612, height=792)
    page.insert_text((72, 40), "Distributor Agreement - Confidential", fontsize=8)
    y = 90.0
    for text in body:
        rect = pymupdf.Rect(72, y, 540, y + 200)
        left = page.insert_textbox(rect, text, fontsize=10, fontname="helv")
        y += 200 - left + 12  # insert_textbox returns the unused height
    if marker:
        page.insert_text((72, y + 4), "*", fontsize=7)
        y += 14
    page.insert_text((300, y + 20), str(number), fontsize=9)


def cross_page_pdf(pages: int = 4) -> bytes:
    doc = pymupdf.open()
    for n in range(1, pages + 1):
        if n == 2:
            _page(doc, n, [FILLER, FILLER, CLAUSE_HEAD], marker=True)
        elif n == 3:
            _page(doc, n, [CLAUSE_TAIL, FILLER])
        else:
            _page(doc, n, [FILLER, FILLER])
    data = doc.tobytes()
    doc.close()
    return data


@pytest.fixture(scope="module")
def pdf() -> bytes:
    return cross_page_pdf()


@pytest.fixture(scope="module")
def document(pdf: bytes) -> Document:
    return read_pdf(pdf)


QUOTE = CLAUSE_HEAD.split(". ", 1)[1] + " " + CLAUSE_TAIL


def test_a_clause_across_a_page_break_verifies_as_one_citation(document: Document) -> None:
    assert find_quote(document.pages[1], QUOTE) is None and find_quote(document.pages[2], QUOTE) is None
    c = verify(document, QUOTE, [2])
    assert c is not None and c.verified and (c.page, c.page_end) == (2, 3) and c.pages == [2, 3]
    first, second = c.parts
    assert document.pages[1].text[first.char_start:first.char_end] == first.quote
    assert document.pages[2].text[second.char_start:second.char_end] == second.quote
    assert first.quote.startswith("Neither this Agreement") and first.quote.endswith("Strategic")
    assert second.quote.startswith("Alliance Agreement") and second.quote.endswith("bound by its terms.")
    assert first.bboxes and second.bboxes and c.bboxes == first.bboxes
    assert "*" not in c.quote and "Confidential" not in c.quote
    # cited on the later page, or one page off: still found
    assert verify(document, QUOTE, [3]).pages == [2, 3]
    # a model that paraphrases a little still verifies (fuzzy across the seam)
    assert verify(document, QUOTE.replace("in whole or in part", "in whole or part"), [2]).pages == [2, 3]


def test_a_different_word_across_the_seam_fails(document: Document) -> None:
    for fake in (QUOTE.replace("Strategic Alliance", "Strategic Partnership"),
                 QUOTE.replace("Siemens", "Philips"),
                 QUOTE.replace("shall be null", "shall not be null"),
                 QUOTE.replace("Strategic Alliance", "Strategic 4 Alliance")):
        assert verify(document, fake, [2, 3]) is None, fake


def test_seam_lines_are_skipped_only_when_whole_and_short() -> None:
    head = "The Supplier shall deliver the Products within thirty (30) days of each purchase order placed by"
    tail = "the Buyer, at the delivery point named in that purchase order, free of any charge for transport."
    pages = [
        Page(number=1, width=612, height=792, text=head + "\n\n17"),
        Page(number=2, width=612, height=792, text="Confidential Treatment Requested\n\n" + tail),
    ]
    from pipelines.document.types import Block

    for page in pages:  # blocks as the reader makes them: one per paragraph
        pos = 0
        for part in page.text.split("\n\n"):
            page.blocks.append(Block(page=page.number, bbox=(72, 72, 540, 90), text=part, char_start=pos,
                                     char_end=pos + len(part)))
            pos += len(part) + 2
    doc = Document(sha256="x", page_count=2, pages=pages)
    c = verify(doc, head + " " + tail, [1])
    assert c is not None and c.pages == [1, 2] and "17" not in c.quote and "Confidential" not in c.quote
    # a different word at the seam is not skipped like a seam line
    assert verify(doc, head.replace(" placed by", " cancelled by") + " " + tail, [1]) is None
    assert verify(doc, head + " 18 " + tail, [1]) is None  # nor a number that is not the page's


def test_annotated_pdf_highlights_every_page_of_the_citation(pdf: bytes, document: Document) -> None:
    c = verify(document, QUOTE, [2])
    out = pymupdf.open(stream=annotate_pdf(pdf, [AnnotatedItem(label="Anti-Assignment", value="Yes",
                                                               citations=[c])]), filetype="pdf")
    highlights = {}
    for page in out:
        highlights[page.number + 1] = [pymupdf.Rect(a.rect) for a in page.annots() if a.type[1] == "Highlight"]
    assert highlights[2] and highlights[3] and not highlights[1] and not highlights[4]
    assert "Alliance" in out[2].get_textbox(highlights[3][0])
    assert "Neither" in out[1].get_textbox(highlights[2][0])


def test_summary_shows_the_page_range(document: Document) -> None:
    c = verify(document, QUOTE, [2])
    result = ContractResult(document_sha256="x", page_count=4, fields=[
        FieldResult(key="anti_assignment", name="Anti-Assignment",
                    values=[ExtractedValue(value="Yes", citations=[c], verified=True)])])
    assert "pp. 2–3" in markdown_summary(result)
