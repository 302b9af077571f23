"""Quote verification (pipelines.document.citations), PDF annotation and the Markdown summary, on small PDFs
built here with PyMuPDF (no model, no reader: Documents are assembled directly from PyMuPDF's blocks)."""

from __future__ import annotations

import hashlib
import random
import re

import pymupdf
import pytest

from pipelines.document.annotate import ANNOT_TITLE, AnnotatedItem, annotate_pdf
from pipelines.document.citations import Citation, find_quote, normalize, verify
from pipelines.document.report import ContractResult, ExtractedValue, FieldResult, markdown_summary
from pipelines.document.types import Block, Document, DocumentError, Page

GOVERNING = (
    "This Agreement shall be governed by and construed in accordance with the laws of the State of "
    "Delaware, without regard to its conflict of laws principles."
)
TERMINATION = (
    "Either party may terminate this Agreement for convenience upon sixty (60) days prior written notice "
    "to the other party."
)
FILLER = "The parties acknowledge that the recitals above form an integral part of this Agreement."


# -- helpers -----------------------------------------------------------------------------------------------------


def make_pdf(pages: list[list[str]]) -> bytes:
    """One text box per paragraph, stacked down the page."""
    doc = pymupdf.open()
    for paragraphs in pages:
        page = doc.new_page()
        y = 72.0
        for text in paragraphs:
            rect = pymupdf.Rect(72, y, 520, y + 120)
            spare = page.insert_textbox(rect, text, fontsize=11, fontname="helv")
            assert spare >= 0, "paragraph does not fit its box"
            y = rect.y1 - spare + 14
    return doc.tobytes()


def read(pdf: bytes) -> Document:
    """Minimal stand-in for the reader: page text = block texts joined by blank lines."""
    doc = pymupdf.open(stream=pdf, filetype="pdf")
    pages = []
    for i, p in enumerate(doc):
        text, blocks = "", []
        for x0, y0, x1, y1, btext, _, btype in p.get_text("blocks", sort=True):
            if btype != 0 or not btext.strip():
                continue
            btext = btext.strip()
            if text:
                text += "\n\n"
            blocks.append(Block(page=i + 1, bbox=(x0, y0, x1, y1), text=btext, char_start=len(text),
                                char_end=len(text) + len(btext)))
            text += btext
        pages.append(Page(number=i + 1, width=p.rect.width, height=p.rect.height, text=text, blocks=blocks))
    return Document(sha256=hashlib.sha256(pdf).hexdigest(), page_count=len(pages), pages=pages)


def text_page(text: str, number: int = 1, scanned: bool = False) -> Page:
    """A page whose text is one block (for normalization tests that don't need a real PDF)."""
    block = Block(page=number, bbox=(72, 72, 520, 200), text=text, char_start=0, char_end=len(text))
    return Page(number=number, width=612, height=792, text=text, blocks=[block], scanned=scanned)


def doc_of(texts: list[str]) -> Document:
    pages = [text_page(t, i + 1) for i, t in enumerate(texts)]
    return Document(sha256="0" * 64, page_count=len(pages), pages=pages)


@pytest.fixture(scope="module")
def contract_pdf() -> bytes:
    return make_pdf([[FILLER, "1. Term"], [FILLER, TERMINATION], [FILLER, GOVERNING], [FILLER, "Delaware"]])


@pytest.fixture(scope="module")
def contract(contract_pdf: bytes) -> Document:
    return read(contract_pdf)


# -- normalization and single-page search -------------------------------------------------------------------------


def test_normalize_index_map_points_into_source():
    src = "  The  “Licensee” shall ﬁle the termi-\nnation notice\u00a0— within 30 days. "
    norm, idx = normalize(src)
    assert norm == "the licensee shall file the termination noticewithin 30 days."
    assert len(idx) == len(norm)
    assert all(src[i].lower() == ch for i, ch in zip(idx, norm) if ch.isascii() and ch not in "fi ")
    assert src[idx[norm.index("file")]] == "ﬁ"


def test_exact_quote(contract: Document):
    c = find_quote(contract.pages[2], "governed by and construed in accordance with the laws of the State of Delaware")
    assert c is not None and c.verified and c.page == 3 and c.similarity == 1.0
    page = contract.pages[2]
    assert c.quote == page.text[c.char_start : c.char_end]
    assert " ".join(c.quote.split()).startswith("governed by") and c.quote.endswith("Delaware")


@pytest.mark.parametrize(
    "page_text, quote",
    [
        ("The Licensee shall   pay the\n  fees within thirty days.", "shall pay the fees within thirty days"),
        ("Upon termi-\nnation of this Agreement, the Licensee shall", "Upon termination of this Agreement"),
        ("The Licensee shall ﬁle all ﬂoor plans with the Licensor.", "shall file all floor plans"),
        ("the “Confidential Information” means all information", "the \"Confidential Information\" means"),
        ("the Licensor\u2019s prior written consent, which", "the Licensor's prior written consent"),
        ("for a term of ten (10) years \u2013 renewable", "ten (10) years - renewable"),
        ("THIS AGREEMENT SHALL BE GOVERNED BY THE LAWS OF NEW YORK", "this Agreement shall be governed by"),
    ],
    ids=["whitespace", "hyphenation", "ligature", "curly-quotes", "apostrophe", "dash", "case"],
)
def test_variants_match_exactly(page_text: str, quote: str):
    page = text_page(page_text)
    c = find_quote(page, quote)
    assert c is not None and c.verified and c.similarity == 1.0
    assert c.quote == page_text[c.char_start : c.char_end]
    assert normalize(c.quote)[0] == normalize(quote)[0]


def test_short_quote_refused_unless_whole_block(contract: Document):
    assert find_quote(contract.pages[2], "Delaware") is None  # inside a sentence: too ambiguous
    c = find_quote(contract.pages[3], "Delaware")  # page 4 has a block that is just "Delaware"
    assert c is not None and c.verified and c.quote == "Delaware"
    assert c.bboxes == [contract.pages[3].blocks[1].bbox]


def test_short_date_or_amount_verifies_only_when_unique_on_the_page() -> None:
    text = "This Agreement is dated May 7, 2023 between the parties. The fee is 4,500 EUR; a second fee is 4,500 EUR."
    page = text_page(text)
    hit = find_quote(page, "May 7, 2023")
    assert hit is not None and hit.quote == "May 7, 2023"
    assert find_quote(page, "4,500 EUR") is None  # twice on the page: which one?
    assert find_quote(page, "parties") is None  # a bare word stays too ambiguous


def test_scanned_page_never_verifies():
    page = text_page(GOVERNING, scanned=True)  # even with (OCR-ish) text present
    assert find_quote(page, GOVERNING) is None
    empty = Page(number=1, width=612, height=792, text="", scanned=True)
    assert verify(Document(sha256="x", page_count=1, pages=[empty]), GOVERNING, [1]) is None


def test_bboxes_cover_the_span(contract_pdf: bytes, contract: Document):
    quote = "laws of the State of Delaware, without regard to its conflict"
    c = find_quote(contract.pages[2], quote)
    assert c is not None
    touched = [b for b in contract.pages[2].blocks if b.char_start < c.char_end and b.char_end > c.char_start]
    assert [b.bbox for b in touched] == c.bboxes and len(c.bboxes) == 1
    box = pymupdf.Rect(c.bboxes[0])
    hits = pymupdf.open(stream=contract_pdf)[2].search_for(quote)
    assert hits and all(box.contains(h) or (box + (-1, -1, 1, 1)).contains(h) for h in hits)
    # a span over two blocks gets both boxes
    two = find_quote(contract.pages[2], "an integral part of this Agreement. This Agreement shall be governed")
    assert two is not None and len(two.bboxes) == 2


def test_fuzzy_accepts_90_percent_and_refuses_70():
    rng = random.Random(0)
    base = normalize(GOVERNING)[0]
    page = text_page(f"{FILLER} {GOVERNING} {TERMINATION}")

    def mutate(fraction: float, long_words_only: bool = False) -> str:
        chars = list(base)
        if long_words_only:  # one typo in each of some long words: the kind of slip a copying model makes
            words = [m for m in re.finditer(r"[a-z]{7,}", base)]
            picks = [m.start() + 2 for m in rng.sample(words, max(1, int(len(chars) * fraction / 2)))]
        else:
            picks = rng.sample([i for i, ch in enumerate(chars) if ch.isalpha()], int(len(chars) * fraction))
        for i in picks:
            chars[i] = "x" if chars[i] != "x" else "y"
        return "".join(chars)

    near = find_quote(page, mutate(0.05, long_words_only=True))
    assert near is not None and near.verified and 0.9 <= near.similarity < 1.0
    assert normalize(near.quote)[0] == base  # cites the real source text, not the model's version
    assert find_quote(page, mutate(0.30)) is None
    # dropped words (insertions relative to the quote) are tolerated the same way
    dropped = base.replace("and construed ", "")
    hit = find_quote(page, dropped)
    assert hit is not None and hit.similarity >= 0.9 and normalize(hit.quote)[0] == base
    assert find_quote(page, dropped, fuzzy=False) is None


# -- verify: page handling ----------------------------------------------------------------------------------------


def test_verify_on_cited_page(contract: Document):
    c = verify(contract, GOVERNING, [3])
    assert c is not None and c.page == 3 and not c.page_corrected


def test_verify_off_by_one_corrects_page(contract: Document):
    for cited in (2, 4):
        c = verify(contract, GOVERNING, [cited])
        assert c is not None and c.page == 3 and c.page_corrected


def test_verify_far_page_refused(contract: Document):
    assert verify(contract, GOVERNING, [1]) is None
    assert verify(contract, GOVERNING, [1], search_neighbours=2).page == 3
    assert verify(contract, GOVERNING, [2], search_neighbours=0) is None
    assert verify(contract, GOVERNING, []) is None
    assert verify(contract, "This text appears nowhere in the contract at all.", [1, 2, 3, 4]) is None


def test_verify_out_of_range_page_uses_neighbour(contract: Document):
    c = verify(doc_of([FILLER, FILLER, FILLER, GOVERNING]), GOVERNING, [5])
    assert c is not None and c.page == 4 and c.page_corrected
    assert contract.page_count == 4


def test_verify_prefers_exact_over_fuzzy_and_cited_page():
    typo = GOVERNING.replace("construed", "construd")
    doc = doc_of([FILLER, typo, GOVERNING])
    c = verify(doc, GOVERNING, [2])  # fuzzy on the cited page, exact on its neighbour
    assert c.page == 3 and c.similarity == 1.0 and c.page_corrected
    both = doc_of([GOVERNING, FILLER, GOVERNING])
    assert verify(both, GOVERNING, [2]).page == 1  # tie: nearest-first order, lower page first


def sixty_pages_hundred_quotes(seed: int = 1):
    """A 60-page document and 100 (quote, page) checks: a third exact, a third with a typo (the fuzzy path), a third
    absent. Also timed by ``bench/citations_bench.py`` (timings live there, not in tests)."""
    rng = random.Random(seed)
    words = ("agreement party licensee licensor shall term notice days written consent fees payment "
             "territory products services confidential information breach cure period law state").split()
    texts = [" ".join(rng.choice(words) for _ in range(450)) + f" page marker {i}." for i in range(60)]
    doc = doc_of(texts)
    quotes = []
    for k in range(100):
        page = rng.randrange(60)
        norm = normalize(texts[page])[0]
        s = rng.randrange(0, len(norm) - 200)
        q = norm[s : s + rng.randrange(40, 200)]
        if k % 3 == 1:  # a typo or two: the fuzzy path
            q = q[:10] + "zq" + q[12:]
        if k % 3 == 2:  # not in the document at all
            q = "zebra quantum " * 4
        quotes.append((q, max(1, page + 1 + rng.choice((-1, 0, 0, 1)))))
    return doc, quotes


def test_60_pages_100_quotes():
    doc, quotes = sixty_pages_hundred_quotes()
    found = [verify(doc, q, [p]) for q, p in quotes]
    assert sum(c is not None for c in found[0::3]) == len(found[0::3])
    assert all(c is None for c in found[2::3])


# -- annotation ---------------------------------------------------------------------------------------------------


def _annots(pdf: bytes) -> dict[int, list[tuple[str, str, str, str, pymupdf.Rect]]]:
    """Per page: (type, subject, title, content, area), the area of a highlight being its quads' extent."""

    def area(a: pymupdf.Annot) -> pymupdf.Rect:
        v = a.vertices
        if not v:
            return a.rect
        return pymupdf.Rect(min(x for x, _ in v), min(y for _, y in v), max(x for x, _ in v), max(y for _, y in v))

    out = {}
    with pymupdf.open(stream=pdf, filetype="pdf") as doc:
        for page in doc:
            out[page.number + 1] = [(a.type[1], a.info["subject"], a.info["title"], a.info["content"], area(a))
                                    for a in page.annots()]
    return out


def test_annotate_highlights_and_notes(contract_pdf: bytes, contract: Document):
    gov = verify(contract, GOVERNING, [2])
    term = verify(contract, "terminate this Agreement for convenience upon sixty (60) days", [2])
    # a citation whose text PyMuPDF cannot find: falls back to the block's box
    odd = term.model_copy(update={"quote": "text that is not drawn on the page at all"})
    items = [
        AnnotatedItem(label="Governing Law", value="Delaware", citations=[gov]),
        AnnotatedItem(label="Termination for Convenience", value="Yes", citations=[term, odd]),
        AnnotatedItem(label="Non-Compete", value="Yes", citations=[Citation.unverified(1, "shall not compete")]),
    ]
    out = annotate_pdf(contract_pdf, items)
    annots = _annots(out)
    assert annots[1] == [] and annots[4] == []  # unverified citation is not drawn
    p3 = annots[3]
    assert sorted(a[0] for a in p3) == ["Highlight", "Text"]
    assert all(a[1] == "Governing Law" and a[2] == ANNOT_TITLE and a[3] == "Governing Law: Delaware" for a in p3)
    highlight = next(a[4] for a in p3 if a[0] == "Highlight")
    with pymupdf.open(stream=contract_pdf) as src:
        quote_rects = src[2].search_for("State of Delaware")
    assert any(highlight.intersects(r) for r in quote_rects)
    assert highlight.height < 60  # the quoted lines, not the whole page
    p2 = annots[2]
    assert [a[0] for a in p2].count("Highlight") == 2 and [a[0] for a in p2].count("Text") == 2
    assert {a[1] for a in p2} == {"Termination for Convenience"}
    block = pymupdf.Rect(term.bboxes[0])
    fallback = [a[4] for a in p2 if a[0] == "Highlight"]
    assert any(abs(r.x0 - block.x0) < 1 and abs(r.y1 - block.y1) < 1 for r in fallback)  # the block's box
    assert any(r.x0 > block.x0 + 20 and r.y1 < block.y1 - 10 for r in fallback)  # the quote's first line only


def test_annotate_without_blocks_searches_the_page(contract_pdf: bytes):
    bare = Citation(page=3, quote="laws of the State of Delaware", verified=True)  # a reader that kept no blocks
    annots = _annots(annotate_pdf(contract_pdf, [AnnotatedItem(label="Governing Law", value="DE", citations=[bare])]))
    assert [a[0] for a in annots[3]] == ["Highlight", "Text"]
    out_of_range = Citation(page=9, quote="laws of the State of Delaware", verified=True)
    assert _annots(annotate_pdf(contract_pdf, [AnnotatedItem(label="x", value="y", citations=[out_of_range])])) == {
        1: [], 2: [], 3: [], 4: []}


def test_annotate_encrypted_needs_password(contract_pdf: bytes, contract: Document):
    src = pymupdf.open(stream=contract_pdf)
    locked = src.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user", owner_pw="owner")
    items = [AnnotatedItem(label="Governing Law", value="Delaware", citations=[verify(contract, GOVERNING, [3])])]
    with pytest.raises(DocumentError) as e:
        annotate_pdf(locked, items)
    assert e.value.code == "encrypted"
    out = annotate_pdf(locked, items, password="user")
    with pymupdf.open(stream=out) as doc:
        assert doc.needs_pass and doc.authenticate("user")
        assert [a.info["subject"] for a in doc[2].annots()] == ["Governing Law", "Governing Law"]


# -- markdown summary ---------------------------------------------------------------------------------------------


def test_markdown_summary(contract: Document):
    gov = verify(contract, GOVERNING, [2])
    result = ContractResult(
        document_sha256=contract.sha256,
        title="Distribution Agreement",
        page_count=4,
        chunks=2,
        schema_kind="cuad",
        unverified_dropped=3,
        warnings=["page 7 is scanned"],
        fields=[
            FieldResult(key="governing_law", name="Governing Law",
                        values=[ExtractedValue(value="Delaware", citations=[gov], verified=True, confidence=0.9,
                                               sources=[1])]),
            FieldResult(key="non_compete", name="Non-Compete",
                        values=[ExtractedValue(value="Yes", verified=False,
                                               citations=[Citation.unverified(1, "shall not compete anywhere")])]),
            FieldResult(key="exclusivity", name="Exclusivity", values=[]),
        ],
    )
    md = markdown_summary(result)
    assert md.startswith("# Distribution Agreement\n")
    assert "4 pages" in md and "2 chunks" in md
    assert "### Governing Law" in md and "**Delaware**" in md and "confidence 0.90" in md
    assert "p. 3 — “This Agreement shall be governed" in md and "(page corrected)" in md
    assert "⚠ unverified: p. 1 — “shall not compete anywhere”" in md
    not_found = md.split("## Not found")[1].split("##")[0]
    assert "Exclusivity" in not_found and "Audit Rights" in not_found and "Governing Law" not in not_found
    assert "3 values dropped" in md and "- page 7 is scanned" in md


# -- integration with the reader / synthetic contracts (when they exist) ------------------------------------------


def test_synthetic_contract_gold_clauses_verify_and_annotate():
    reader = pytest.importorskip("pipelines.document.reader")
    synthetic = pytest.importorskip("pipelines.document.synthetic")
    categories = ["Governing Law", "Insurance", "Non-Compete", "Exclusivity", "Audit Rights", "Cap on Liability",
                  "Minimum Commitment", "Price Restrictions", "License Grant", "Anti-Assignment", "Renewal Term"]
    contract = synthetic.make_contract(pages=8, seed=3, clauses=categories)
    doc = reader.read_pdf(contract.pdf)
    items, checked = [], 0
    for clause in contract.gold:
        if clause.page is None or len(normalize(clause.text)[0]) < 12:
            continue
        found = verify(doc, clause.text, [clause.page], search_neighbours=0)
        if clause.page in contract.scanned_pages:
            assert found is None, clause  # no text layer: never verified
            continue
        assert found is not None and found.page == clause.page and found.bboxes, clause
        items.append(AnnotatedItem(label=clause.category, value="Yes", citations=[found]))
        checked += 1
    assert checked >= 10
    annots = _annots(annotate_pdf(contract.pdf, items))
    for item in items:
        page = item.citations[0].page
        n = sum(1 for it in items if it.label == item.label and it.citations[0].page == page)
        kinds = [a[0] for a in annots[page] if a[1] == item.label]
        assert kinds.count("Highlight") == n and kinds.count("Text") == n, item.label


def test_fuzzy_matching_never_verifies_a_different_fact() -> None:
    from pipelines.document.citations import find_quote
    from pipelines.document.types import Block, Page

    text = "This Agreement shall be governed by the laws of the State of Ohio, without regard to conflicts. " \
           "Either party may terminate this Agreement upon thirty (30) days written notice."
    page = Page(number=3, width=612, height=792, text=text,
                blocks=[Block(page=3, bbox=(72, 72, 540, 140), text=text, char_start=0, char_end=len(text))])
    assert find_quote(page, "governed by the laws of the State of Ohio, without regard to conflicts").verified
    assert find_quote(page, "governed by the laws of the State of Mars, without regard to conflicts") is None
    assert find_quote(page, "governed by the laws of Mars") is None
    assert find_quote(page, "terminate this Agreement upon sixty (60) days written notice") is None
    typo = find_quote(page, "Either party may termnate this Agreement upon thirty (30) days written notice")
    assert typo is not None and typo.similarity < 1.0  # a typo in a long word is still the same fact
