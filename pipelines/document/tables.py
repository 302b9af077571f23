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
        drawings = page.get_cdrawings()
        grid = ruling_grid(drawings) if len(drawings) >= _MIN_DRAWINGS else None
        if grid is None:
            return []
        found = page.find_tables(clip=(grid + (-2, -2, 2, 2)) & page.rect)
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


def ruling_grid(drawings: list[dict]) -> pymupdf.Rect | None:
    """Area of the page's ruling lines if they could form a grid (>= 3 distinct vertical and horizontal rules),
    else None. Underlines, boxes around code and separators never qualify, which spares ``find_tables`` (a few
    hundred milliseconds on a text-heavy page)."""
    xs: set[int] = set()
    ys: set[int] = set()
    area = pymupdf.Rect()
    for path in drawings:
        for item in path.get("items", ()):
            kind = item[0]
            if kind == "l":
                (x0, y0), (x1, y1) = item[1], item[2]
            elif kind in ("re", "qu"):
                r = pymupdf.Rect(item[1]) if kind == "re" else pymupdf.Quad(item[1]).rect
                x0, y0, x1, y1 = r
            else:
                continue
            w, h = abs(x1 - x0), abs(y1 - y0)
            if h < 3 and w >= 5:  # horizontal rule (a line or a thin rectangle)
                ys.add(round((y0 + y1) / 2))
            elif w < 3 and h >= 5:  # vertical rule
                xs.add(round((x0 + x1) / 2))
            elif kind != "l" and w >= 5 and h >= 5:  # a cell or box: all four edges
                xs.update((round(x0), round(x1)))
                ys.update((round(y0), round(y1)))
            else:
                continue
            area |= pymupdf.Rect(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    if len(xs) < 3 or len(ys) < 3:
        return None
    return area


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
