"""Ruled tables of a page: cell values and a Markdown rendering the model can read.

``find_tables`` costs a few milliseconds a page even when there is nothing to find, so it only runs on pages
that draw vector lines (its default strategy needs ruling lines anyway).
"""

from __future__ import annotations

import pymupdf

from pipelines.document.types import BBox, Table

if hasattr(pymupdf, "no_recommend_layout"):  # find_tables otherwise prints an advert on stdout once
    pymupdf.no_recommend_layout()

_MIN_DRAWINGS = 4  # a ruled table with at least 2x2 cells draws more paths than this


def find_tables(page: pymupdf.Page, page_number: int) -> list[Table]:
    """Tables with at least two rows and two columns (a 1x1 "table" is a framed paragraph: left as text)."""
    try:
        if len(page.get_cdrawings()) < _MIN_DRAWINGS:
            return []
        found = page.find_tables()
    except Exception:  # noqa: BLE001 - a table finder failure must not lose the page's text
        return []
    tables: list[Table] = []
    for tab in found.tables:
        try:
            raw = tab.extract()
        except Exception:  # noqa: BLE001
            continue
        rows = [[_cell(c) for c in row] for row in raw]
        rows = [r for r in rows if any(r)]
        if len(rows) < 2 or max(len(r) for r in rows) < 2:
            continue
        bbox: BBox = tuple(float(v) for v in tab.bbox)  # type: ignore[assignment]
        tables.append(Table(page=page_number, bbox=bbox, rows=rows, markdown=to_markdown(rows)))
    return tables


def _cell(value: str | None) -> str:
    return " ".join((value or "").split())


def to_markdown(rows: list[list[str]]) -> str:
    """GitHub-style pipe table; the first row is the header (what ruled contract tables nearly always have)."""
    width = max(len(r) for r in rows)
    padded = [r + [""] * (width - len(r)) for r in rows]

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    lines = [fmt(padded[0]), "| " + " | ".join(["---"] * width) + " |"]
    lines.extend(fmt(r) for r in padded[1:])
    return "\n".join(lines)
