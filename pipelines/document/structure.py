"""Numbered clause structure: which lines are headings, and which section every block belongs to.

Contracts number their clauses ("1. Definitions", "12.3 Termination for Convenience", "ARTICLE IV – INDEMNIFICATION",
"Section 5. Governing Law", "EXHIBIT A"). A line only counts as a heading when what follows the number looks like
a title (short, Title Case or CAPITALS), so a wrapped prose line that happens to start with a number does not.
Run-in headings ("7.2 Audit Rights. Customer may …") open a section but their block stays ``text``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.document.layout import Line, RawBlock
from pipelines.document.types import Section

_SEP = r"\s*(?:[-–—:.]\s*)?"
_ARTICLE = re.compile(r"^(?:ARTICLE|Article)\s+([IVXLCDM]+|\d{1,3})\b\.?" + _SEP + r"(.*)$")
_SECTION = re.compile(r"^(?:SECTION|Section|§)\s*(\d{1,3}(?:\.\d{1,3}){0,4})\b\.?" + _SEP + r"(.*)$")
_NUMBERED = re.compile(r"^(\d{1,3}(?:\.\d{1,3}){0,4})(\.?)\s+(\S.*)$")
_ANNEX = re.compile(
    r"^(EXHIBIT|SCHEDULE|ANNEX|APPENDIX|Exhibit|Schedule|Annex|Appendix)\s+([A-Z0-9]{1,3})\b\.?" + _SEP + r"(.*)$"
)
_UNNUMBERED = {"RECITALS", "WITNESSETH", "BACKGROUND", "DEFINITIONS", "TERMS AND CONDITIONS", "GENERAL PROVISIONS"}
_SMALL = {
    "a", "an", "and", "as", "at", "by", "for", "from", "in", "into", "of", "on", "or", "the", "to", "with",
    "upon", "under", "its", "per", "not", "vs", "between", "against",
}  # fmt: skip
_WORD = re.compile(r"[A-Za-z][A-Za-z'’&/-]*")


@dataclass
class Heading:
    number: str | None
    title: str
    level: int
    run_in: bool = False  # the line goes on with body text after the title
    article: bool = False


def looks_like_title(text: str, max_words: int = 10) -> bool:
    """Short, starts with a capital, and most significant words capitalised."""
    s = text.strip().rstrip(".:")
    if not s or len(s) > 90 or not (s[0].isupper() or s[0] in "(\"“"):
        return False
    if s[-1] in ",;" or s.count(",") > 2:
        return False
    words = _WORD.findall(s)
    if not words or len(words) > max_words:
        return False
    significant = [w for w in words if w.lower() not in _SMALL]
    if not significant:
        return False
    return sum(w[0].isupper() for w in significant) >= 0.75 * len(significant)


def match_heading(line: Line) -> Heading | None:
    """The heading this line opens, if it is one."""
    text = line.text.strip()
    if len(text) > 400:
        return None
    m = _ARTICLE.match(text)
    if m:
        title = m.group(2).strip().rstrip(".")
        if title and not looks_like_title(title):
            return None
        return Heading(number=m.group(1), title=title or f"Article {m.group(1)}", level=1, article=True)
    m = _SECTION.match(text)
    if m:
        return _numbered(m.group(1), m.group(2), dotted=True, strong=True)
    m = _NUMBERED.match(text)
    if m:
        return _numbered(m.group(1), m.group(3), dotted=bool(m.group(2)), strong=line.bold)
    m = _ANNEX.match(text)
    if m and (line.bold or m.group(1).isupper()):
        title = m.group(3).strip().rstrip(".")
        if title and not looks_like_title(title):
            return None
        label = f"{m.group(1).title()} {m.group(2)}"
        return Heading(number=label, title=title or label, level=1)
    if text.upper() == text and text.rstrip(":.") in _UNNUMBERED:
        return Heading(number=None, title=text.rstrip(":."), level=1)
    return None


def _numbered(number: str, rest: str, *, dotted: bool, strong: bool) -> Heading | None:
    rest = rest.strip()
    depth = number.count(".") + 1
    title, run_in = rest, False
    if not looks_like_title(rest):
        head, sep, tail = rest.partition(". ")
        if not sep or not tail or not looks_like_title(head, max_words=8):
            return None
        title, run_in = head, True
    title = title.rstrip(".:").strip()
    # "10 Main Street" is an address line, not clause 10: undotted single numbers need bold or capitals
    if (depth == 1 and not dotted and not (strong or title.upper() == title)) or any(c.isdigit() for c in title):
        return None
    return Heading(number=number, title=title, level=depth, run_in=run_in)


def split_at_headings(blocks: list[RawBlock]) -> list[RawBlock]:
    """Blocks cut so that every heading starts its own block; standalone headings become ``heading`` blocks.

    An ``ARTICLE IV`` line followed by a capitalised line takes that line as its title (two-line headings).
    """
    out: list[RawBlock] = []
    for block in blocks:
        if block.kind == "table":
            out.append(block)
            continue
        current: list[Line] = []
        lines = block.lines
        i = 0
        while i < len(lines):
            heading = match_heading(lines[i])
            if heading is None:
                current.append(lines[i])
                i += 1
                continue
            if current:
                out.append(RawBlock(lines=current))
                current = []
            if heading.run_in:
                current = [lines[i]]
                i += 1
                continue
            taken = [lines[i]]
            if heading.article and heading.title.startswith("Article ") and i + 1 < len(lines):
                nxt = lines[i + 1].text
                if nxt.upper() == nxt and looks_like_title(nxt):
                    taken.append(lines[i + 1])
            out.append(RawBlock(lines=taken, kind="heading"))
            i += len(taken)
        if current:
            out.append(RawBlock(lines=current))
    return out


class SectionTracker:
    """Carries the current section across blocks and pages, and collects the sections found."""

    def __init__(self) -> None:
        self.sections: list[Section] = []
        self.current: str | None = None
        self._in_articles = False

    def visit(self, block: RawBlock, page: int) -> None:
        """Open a section if the block starts with a heading; label the block with the current section."""
        if block.kind != "table" and block.lines:
            heading = match_heading(block.lines[0])
            if heading is not None and (block.kind == "heading" or heading.run_in):
                title = heading.title
                if heading.article and title.startswith("Article ") and len(block.lines) > 1:
                    title = block.lines[1].text.strip()
                level = heading.level
                if heading.article:
                    self._in_articles = True
                elif self._in_articles and heading.number and heading.number[0].isdigit():
                    level += 1  # numbered clauses inside an article sit one level below it
                self.sections.append(Section(number=heading.number, title=title, page=page, level=level))
                self.current = heading.number or title
        block.section = self.current
