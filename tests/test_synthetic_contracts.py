"""Synthetic contracts: deterministic per seed, gold clauses really on their pages, valid CUAD category names."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pymupdf
import pytest

from pipelines.document.synthetic import SyntheticContract, make_bad_pdfs, make_contract, make_long_pdf
from pipelines.document.synthetic_text import CLAUSE_CATEGORIES, PREAMBLE_CATEGORIES

CUAD_CSV = Path(__file__).resolve().parents[1] / "pipelines" / "document" / "cuad_categories.csv"  # shipped copy


def norm(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def small() -> SyntheticContract:
    return make_contract(14, seed=3)


def test_deterministic_per_seed(small: SyntheticContract) -> None:
    again = make_contract(14, seed=3)
    assert again.pdf == small.pdf
    assert again.gold == small.gold and again.sections == small.sections
    other = make_contract(14, seed=4)
    assert other.pdf != small.pdf
    assert [g.text for g in other.gold] != [g.text for g in small.gold]


@pytest.mark.parametrize("pages", [2, 5, 14, 60])
def test_page_count_and_layout(pages: int) -> None:
    c = make_contract(pages, seed=1)
    with pymupdf.open(stream=c.pdf, filetype="pdf") as doc:
        assert doc.page_count == c.page_count == pages
    assert c.title and len(c.parties) == 2 and c.parties[0] != c.parties[1]
    if pages >= 5:
        specials = [c.table_page, c.two_column_page, *c.scanned_pages]
        assert None not in specials and len(set(specials)) == 3
        assert all(2 <= p < pages for p in specials)


def test_gold_text_on_gold_page(small: SyntheticContract) -> None:
    with pymupdf.open(stream=small.pdf, filetype="pdf") as doc:
        texts = [norm(page.get_text()) for page in doc]
        images = [len(page.get_images()) for page in doc]
    for gold in small.gold:
        assert gold.page is not None
        if gold.page in small.scanned_pages:
            assert texts[gold.page - 1] == "" and images[gold.page - 1] == 1
            continue
        assert norm(gold.text) in texts[gold.page - 1], gold.category
        if gold.category in CLAUSE_CATEGORIES:  # body clauses are stated once
            assert sum(norm(gold.text) in t for t in texts) == 1, gold.category
    # every page has the running header and footer (scanned pages carry them in the image)
    for n, text in enumerate(texts, 1):
        if n not in small.scanned_pages:
            assert f"Page {n} of {small.page_count}" in text and norm(small.header) in text


def test_special_pages(small: SyntheticContract) -> None:
    assert small.gold_for("Minimum Commitment")[0].page == small.table_page
    assert small.gold_for("Insurance")[0].page in small.scanned_pages
    assert {g.category for g in small.gold if g.page == small.two_column_page} == {"Non-Compete", "Exclusivity"}
    assert small.table_rows[0] == ["Item", "Description", "Annual Fee"]
    assert small.left_column and small.right_column


def test_categories_are_cuad_names(small: SyntheticContract) -> None:
    with CUAD_CSV.open(newline="") as f:
        names = {row[0].removeprefix("Category: ").strip() for row in list(csv.reader(f))[1:] if row}
    assert set(CLAUSE_CATEGORIES) | set(PREAMBLE_CATEGORIES) <= names
    assert {g.category for g in small.gold} == set(CLAUSE_CATEGORIES) | set(PREAMBLE_CATEGORIES)


def test_clause_selection_and_validation() -> None:
    c = make_contract(6, seed=2, clauses=["Governing Law", "Audit Rights"], scanned_pages=[], table_page=None)
    assert {g.category for g in c.gold} == {"Governing Law", "Audit Rights", *PREAMBLE_CATEGORIES}
    assert c.table_page is None and c.scanned_pages == [] and c.two_column_page is not None
    with pytest.raises(ValueError):
        make_contract(6, clauses=["Not A Category"])
    with pytest.raises(ValueError):
        make_contract(6, table_page=3, two_column_page=3)
    with pytest.raises(ValueError):
        make_contract(6, scanned_pages=[6])  # the signature page


def test_bad_pdfs_and_long_pdf(tmp_path: Path) -> None:
    files = make_bad_pdfs(tmp_path)
    assert set(files) == {"encrypted", "corrupt", "empty", "not_pdf"}
    assert all(p.suffix == ".pdf" and p.stat().st_size > 0 for p in files.values())
    assert files["not_pdf"].read_bytes().startswith(b"\x89PNG")
    with pymupdf.open(files["encrypted"]) as doc:
        assert doc.needs_pass and doc.authenticate("secret")
    t = time.perf_counter()
    long = make_long_pdf(2000)
    assert time.perf_counter() - t < 10
    with pymupdf.open(stream=long, filetype="pdf") as doc:
        assert doc.page_count == 2000
        assert "Page 2000 of 2000" in doc[-1].get_text()
