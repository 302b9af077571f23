"""Running headers and footers ("page furniture"): learned from a sample of pages, then dropped from every page.

A line is furniture when it sits at the edge of the page's text (in the top or bottom margin band, or among the
first/last few text lines: filings printed from HTML put the page number and legends mid-sheet, right under the
last line of text) and, with digit runs replaced by ``#`` ("Page 3 of 60" and "Page 12 of 60" both become
"page # of #"), recurs on at least half of the sampled pages. Sampling a bounded number of pages keeps the cost
flat for 2,000-page files.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable

from pipelines.document.layout import Line, RawBlock

SAMPLE_PAGES = 40
MIN_PAGES = 3
MIN_SHARE = 0.5
EDGE_LINES = 3  # the first and last this many text lines of a page are furniture candidates too

_DIGITS = re.compile(r"\d+")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)  # non-breaking spaces, ligatures
    return " ".join(_DIGITS.sub("#", text).lower().split())


def band(height: float) -> float:
    """Height of the top and of the bottom margin band."""
    return max(54.0, 0.1 * height)


def in_margin(line: Line, height: float) -> bool:
    b = band(height)
    return line.bbox[3] <= b or line.bbox[1] >= height - b


def edge_lines(lines: Iterable[Line], k: int = EDGE_LINES) -> set[int]:
    """``id()`` of the top ``k`` and bottom ``k`` lines of a page (by vertical position)."""
    ordered = sorted(lines, key=lambda ln: (ln.bbox[1], ln.bbox[0]))
    return {id(ln) for ln in ordered[:k] + ordered[-k:]}


_PAGE_NUMBER = re.compile(r"^[\W_]*(page|p\.)?\s*#(\s*(of|/)\s*#)?[\W_]*$")


def pattern(line: Line, height: float, edges: set[int]) -> str | None:
    """The line's furniture key, None when it is no candidate.  In the margin bands digit runs are wildcards;
    edge lines outside them must repeat verbatim (a page number is the one wildcard there), so body lines that
    differ only in their numbers ("Body line 1 of page 5") are never taken for furniture."""
    if in_margin(line, height):
        return normalise(line.text)
    if id(line) not in edges:
        return None
    key = normalise(line.text)
    if _PAGE_NUMBER.match(key):
        return key
    return "=" + " ".join(unicodedata.normalize("NFKC", line.text).lower().split())


def margin_patterns(lines: Iterable[Line], height: float) -> set[str]:
    lines = list(lines)
    edges = edge_lines(lines)
    return {k for ln in lines if (k := pattern(ln, height, edges))}


def sample_indices(page_count: int, k: int = SAMPLE_PAGES) -> list[int]:
    """Up to ``k`` page indices spread evenly over the document."""
    if page_count <= k:
        return list(range(page_count))
    return sorted({round(i * (page_count - 1) / (k - 1)) for i in range(k)})


def learn(page_count: int, lines_of: Callable[[int], tuple[list[Line], float] | None]) -> set[str]:
    """Furniture patterns from sampled pages; ``lines_of(i)`` gives page i's lines and height (None: skip)."""
    counts: Counter[str] = Counter()
    seen = 0
    for i in sample_indices(page_count):
        got = lines_of(i)
        if got is None:
            continue
        lines, height = got
        seen += 1
        counts.update(margin_patterns(lines, height))
    if seen < MIN_PAGES:
        return set()
    need = max(2, math.ceil(MIN_SHARE * seen))
    return {p for p, c in counts.items() if c >= need and p}


def strip(blocks: list[RawBlock], patterns: set[str], height: float) -> tuple[list[RawBlock], list[str]]:
    """Blocks without furniture lines, and the removed lines' texts (in page order)."""
    if not patterns:
        return blocks, []
    kept: list[RawBlock] = []
    removed: list[str] = []
    edges = edge_lines([ln for b in blocks for ln in b.lines])
    for block in blocks:
        lines = []
        for ln in block.lines:
            if pattern(ln, height, edges) in patterns:
                removed.append(ln.text)
            else:
                lines.append(ln)
        if lines:
            block.lines = lines
            kept.append(block)
    return kept, removed
