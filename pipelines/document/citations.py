"""Check that a model's quote is really in the document, and find where: page, character span, boxes.

Models copy text imperfectly: whitespace and line breaks change, curly quotes become straight, ligatures
(``ﬁ``) are expanded, words hyphenated at a line break are joined, the case changes, a character or two is
off, and the cited page is often one off.  :func:`normalize` removes the harmless differences (keeping a map
back to the original text so the exact source span can be cited), :func:`find_quote` searches one page
exactly and then fuzzily (a window at least 90% similar), :func:`verify` searches the cited pages and their
neighbours only, so a quote is never "verified" by a coincidental match far from where the model saw it.

A clause that runs over a page break is searched in the text of consecutive pages joined (:func:`find_across`);
short page-edge lines that survived furniture removal (a page number, a footnote marker, a one-off legend in the
margin) are skipped at the seam when the quote does not contain them, whole lines only, so a changed or dropped
word of the clause itself still fails.  Such a citation has one part per page it touches (``parts``).
"""

from __future__ import annotations

import re

import unicodedata
from difflib import SequenceMatcher
from functools import lru_cache
from typing import Iterable, Literal

from pydantic import BaseModel, Field

from pipelines.document.types import BBox, Document, Page

MIN_QUOTE_CHARS = 12  # normalized; shorter quotes only count when they are a whole block
FUZZY_THRESHOLD = 0.9
OCR_FUZZY_THRESHOLD = 0.85  # text read by OCR: a few more misread characters are tolerated

# Every dash is dropped together with the whitespace around it, on both sides of a comparison: that joins
# "termi-\nnation" and also makes "long-term" equal "long-\nterm" and "long–term".  The soft hyphen is a dash.
_DASHES = frozenset("-\u00ad\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d")
# Quote marks and apostrophes are dropped: models swap, add and omit them freely.
_QUOTES = frozenset("'\"`\u00b4\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u2032\u2033\u00ab\u00bb\u2039\u203a")
_INVISIBLE = frozenset("\u200b\u200c\u200d\u2060\ufeff")


MAX_SPAN_PAGES = 3  # a quote is searched over at most this many consecutive pages
SEAM_SKIP_WORDS = 12  # page-edge lines of at most this many words may be skipped between two pages' parts


class CitationPart(BaseModel):
    """The piece of a cross-page citation that lies on one page."""

    page: int
    char_start: int
    char_end: int
    bboxes: list[BBox] = Field(default_factory=list)
    quote: str


class Citation(BaseModel):
    """Where a quote was found.  ``quote`` is the source text ``page.text[char_start:char_end]``, not the
    model's version.  Unverified citations (see :meth:`unverified`) keep the model's page and quote.

    A quote across a page break starts on ``page`` and ends on ``page_end``; ``parts`` then has one entry per
    page (``char_start``/``char_end``/``bboxes`` above describe the first part, ``quote`` is the parts' texts
    joined by a space).  ``source`` is ``"ocr"`` when the text it was checked against came from OCR."""

    page: int
    page_end: int | None = None
    char_start: int | None = None
    char_end: int | None = None
    bboxes: list[BBox] = Field(default_factory=list)
    quote: str
    verified: bool
    similarity: float = 1.0  # 1.0 exact (after normalization), else the fuzzy window's similarity
    page_corrected: bool = False  # found on a neighbour of the cited page(s)
    source: Literal["text", "ocr"] = "text"
    parts: list[CitationPart] = Field(default_factory=list)
    anchor: str | None = None  # Word/e-mail input: the paragraph (message, attachment) of the original file

    @classmethod
    def unverified(cls, page: int, quote: str) -> "Citation":
        return cls(page=page, quote=quote, verified=False, similarity=0.0)

    @property
    def pages(self) -> list[int]:
        return [p.page for p in self.parts] if self.parts else [self.page]

    def segments(self) -> list[CitationPart]:
        """One entry per page the citation touches (a single-page citation is its own one segment)."""
        if self.parts:
            return list(self.parts)
        return [CitationPart(page=self.page, char_start=self.char_start or 0, char_end=self.char_end or 0,
                             bboxes=list(self.bboxes), quote=self.quote)]


def normalize(text: str) -> tuple[str, list[int]]:
    """``(normalized, index_map)``: ``normalized[i]`` comes from ``text[index_map[i]]``.

    Lower-cased, NFKC (ligatures, full-width forms, non-breaking spaces), whitespace runs collapsed to one
    space and trimmed, quote marks removed, dashes removed together with adjacent whitespace.
    """
    out: list[str] = []
    idx: list[int] = []
    pending = -1  # original index of a whitespace run not yet emitted
    after_dash = False
    for i, c in enumerate(text):
        chars = c if c < "\x80" else unicodedata.normalize("NFKC", c)
        for ch in chars:
            if ch in _DASHES:
                pending = -1
                after_dash = True
            elif ch.isspace():
                if pending < 0 and out and not after_dash:
                    pending = i
            elif ch in _QUOTES or ch in _INVISIBLE:
                continue
            else:
                if pending >= 0:
                    out.append(" ")
                    idx.append(pending)
                    pending = -1
                after_dash = False
                low = ch.lower()
                out.append(low)
                if len(low) == 1:
                    idx.append(i)
                else:
                    idx.extend([i] * len(low))
    return "".join(out), idx


@lru_cache(maxsize=512)
def _normalized(text: str) -> tuple[str, tuple[int, ...]]:
    """Pages are searched once per quote: cache their normalization by text."""
    norm, idx = normalize(text)
    return norm, tuple(idx)


def _fuzzy_find(q: str, t: str, threshold: float) -> tuple[int, int, float] | None:
    """Best window of ``t`` with SequenceMatcher similarity >= ``threshold`` to ``q``, as (start, end, sim).

    Candidates come from q's pieces found exactly in ``t``: with at most ``d`` edits and ``d + 1`` pieces,
    one piece survives intact (pigeonhole), and its offset says where the window starts.  Windows are then
    scored on a region around the candidate only, which keeps this linear in the page size.
    """
    n = len(q)
    if n == 0 or not t:
        return None
    # At similarity s a window can differ by up to 2(1-s)/s of n in insertions/deletions (~22% at 0.9).
    d = int(n * 2 * (1 - threshold) / threshold) + 1
    pieces = min(d + 1, max(1, n // 3))
    size = n // pieces
    hits: dict[int, list[tuple[int, int, int]]] = {}  # diagonal (implied window start) -> (offset, pos, len)
    for k in range(pieces):
        off = k * size
        piece = q[off : off + size] if k < pieces - 1 else q[off:]
        pos = t.find(piece)
        while pos >= 0:
            hits.setdefault(pos - off, []).append((off, pos, len(piece)))
            pos = t.find(piece, pos + 1)
    if not hits:
        return None
    # Indels shift a piece's diagonal by up to d: score each start by the hits in [start, start + d].
    starts = sorted(hits)
    windows: list[tuple[int, int, int]] = []  # (votes, first index, end index) into starts
    j = total = 0
    for i, s in enumerate(starts):
        while j < len(starts) and starts[j] <= s + d:
            total += len(hits[starts[j]])
            j += 1
        windows.append((total, i, j))
        total -= len(hits[s])
    windows.sort(key=lambda w: (-w[0], w[1]))
    # Windows with few votes are coincidences, not worth an alignment.  A >= 90% similar window keeps about
    # half of the pieces intact when its edits are spread at random (0.9**4 = 66% for substitutions, ~45% for
    # the most deletions allowed); edits clustered in a few words, as models make them, keep even more.
    min_votes = max(1, int(0.3 * pieces), windows[0][0] // 2)
    best: tuple[int, int, float] | None = None
    tried: list[int] = []
    for votes, i, j in windows:
        if votes < min_votes or len(tried) == 3:
            break
        if any(abs(starts[i] - s) <= d for s in tried):
            continue
        tried.append(starts[i])
        group = [h for s in starts[i:j] for h in hits[s]]
        first = min(group)
        last = max(group, key=lambda h: h[0] + h[2])
        head, tail = first[0], n - last[0] - last[2]
        # The unmatched head/tail of q may map to text longer by at most its own edits (<= d).
        lo = max(0, first[1] - head - min(d, head) - 1)
        hi = last[1] + last[2] + tail + min(d, tail) + 1
        hit = _align(q, t, lo, hi)
        if hit is None:
            continue
        # SequenceMatcher ties go to the leftmost copy, so a repeated phrase just before the quote can steal its
        # first words: align again on a region derived from the matched core.
        (a0, b0), (a1, b1) = hit[3], hit[4]
        head, tail = a0, n - a1
        if head or tail:
            hit = _align(q, t, max(0, b0 - head - min(d, head) - 1), b1 + tail + min(d, tail) + 1) or hit
        if hit[2] < threshold:
            continue
        w0, w1, sim = _word_bounds(t, hit, n, threshold)
        if best is None or sim > best[2]:
            best = (w0, w1, sim)
    return best


def _word_bounds(t: str, hit: tuple, n: int, threshold: float) -> tuple[int, int, float]:
    """When the quote's first/last letters were typos the window cuts a word: grow it by (at most) the
    unmatched head/tail of the quote, to whole words, while it stays similar enough."""
    w0, w1, sim = hit[0], hit[1], hit[2]
    matched = sim * (n + w1 - w0) / 2
    head, tail = min(hit[3][0], 3), min(n - hit[4][0], 3)
    x0, x1 = w0, w1
    while head and 0 < x0 and t[x0 - 1].isalnum() and t[x0].isalnum():
        x0, head = x0 - 1, head - 1
    while tail and x1 < len(t) and t[x1 - 1].isalnum() and t[x1].isalnum():
        x1, tail = x1 + 1, tail - 1
    grown = 2 * matched / (n + x1 - x0)
    return (x0, x1, grown) if grown >= threshold else (w0, w1, sim)


def _align(q: str, t: str, lo: int, hi: int) -> tuple[int, int, float, tuple[int, int], tuple[int, int]] | None:
    """Tightest window of ``t[lo:hi]`` matching ``q``: (start, end, similarity, (q, t) at its first matched
    char, (q, t) after its last matched char), positions in ``t``."""
    region = t[lo:hi]
    blocks = [b for b in SequenceMatcher(None, q, region, autojunk=False).get_matching_blocks() if b.size]
    if not blocks:
        return None
    n = len(q)

    def sim(bs: list) -> float:
        return 2.0 * sum(b.size for b in bs) / (n + bs[-1].b + bs[-1].size - bs[0].b)

    # Drop stray matches at the ends when that makes the window more similar.
    score = sim(blocks)
    while len(blocks) > 1:
        head, tail = sim(blocks[1:]), sim(blocks[:-1])
        if max(head, tail) <= score:
            break
        blocks, score = (blocks[1:], head) if head >= tail else (blocks[:-1], tail)
    first, last = blocks[0], blocks[-1]
    return (lo + first.b, lo + last.b + last.size, score, (first.a, lo + first.b),
            (last.a + last.size, lo + last.b + last.size))


def _blocks_touching(page: Page, start: int, end: int) -> list[BBox]:
    return [b.bbox for b in page.blocks if b.char_start < end and b.char_end > start]


def _source(page: Page) -> Literal["text", "ocr"]:
    return "ocr" if page.ocr else "text"


def _citation(page: Page, idx: tuple[int, ...], a: int, b: int, sim: float) -> Citation:
    start, end = idx[a], idx[b - 1] + 1
    return Citation(
        page=page.number,
        char_start=start,
        char_end=end,
        bboxes=_blocks_touching(page, start, end),
        quote=page.text[start:end],
        verified=True,
        similarity=round(sim, 4),
        source=_source(page),
    )


def _whole_block(page: Page, q: str) -> Citation | None:
    for block in page.blocks:
        span = page.text[block.char_start : block.char_end] or block.text
        if _normalized(span)[0] == q:
            return Citation(
                page=page.number,
                char_start=block.char_start,
                char_end=block.char_end,
                bboxes=[block.bbox],
                quote=page.text[block.char_start : block.char_end],
                verified=True,
            )
    return None


def _specific(q: str) -> bool:
    """A short quote that names a number (a date, an amount, a term in days) rather than a bare word."""
    return len(q) >= 6 and any(ch.isdigit() for ch in q)


def find_quote(page: Page, quote: str, *, fuzzy: bool = True, threshold: float = FUZZY_THRESHOLD) -> Citation | None:
    """Find ``quote`` on one page: exact after normalization, else (``fuzzy``) a window >= ``threshold``
    similar.  A scanned page verifies only against its OCR text (fuzzier, numbers and names still exact)."""
    if (page.scanned and not page.ocr) or not page.text or not quote:
        return None
    q, _ = normalize(quote)
    if not q:
        return None
    if page.ocr:  # OCR misreads characters: always allow the fuzzy window (content words still checked)
        fuzzy = True
        threshold = min(threshold, OCR_FUZZY_THRESHOLD)
    if len(q) < MIN_QUOTE_CHARS:
        whole = _whole_block(page, q)
        if whole is not None or not _specific(q):
            return whole
        t, idx = _normalized(page.text)
        pos = t.find(q)
        if pos >= 0 and t.find(q, pos + 1) < 0:  # a short date or amount, once on the page: unambiguous
            return _citation(page, idx, pos, pos + len(q), 1.0)
        return None
    t, idx = _normalized(page.text)
    pos = t.find(q)
    if pos >= 0:
        return _citation(page, idx, pos, pos + len(q), 1.0)
    if not fuzzy:
        return None
    hit = _fuzzy_find(q, t, threshold)
    if hit is None or not _same_content_words(q, t[hit[0]:hit[1]]):
        return None
    return _citation(page, idx, hit[0], hit[1], hit[2])


_CONTENT_WORD = re.compile(r"[^\W_]*\d[^\W_]*|[^\W\d_]{4,}")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_NEGATION = re.compile(r"\b(?:not|no|nor|never|neither|none|nothing|without|non)\b")


def _same_content_words(quote: str, source: str) -> bool:
    """Fuzzy tolerance is for spacing, punctuation, hyphenation and small typos, never for different facts: every
    number and every word of 4+ letters of the quote must be in the matched source text (one-letter typos in
    words of 7+ letters are forgiven). Otherwise "governed by the laws of Mars" would verify against "governed by
    the laws of Ohio" at 90% similarity.  The quote's numbers must come in the source's order (a number changed
    into one that occurs elsewhere in the window still fails), and both must say "not"/"no"/"without"... equally
    often ("shall" is not "shall not")."""
    if len(_NEGATION.findall(quote)) != len(_NEGATION.findall(source)):
        return False
    numbers = iter(_NUMBER.findall(source))
    if not all(any(n == m for m in numbers) for n in _NUMBER.findall(quote)):  # an ordered subsequence
        return False
    have = set(_CONTENT_WORD.findall(source))
    for word in _CONTENT_WORD.findall(quote):
        if word in have:
            continue
        if any(ch.isdigit() for ch in word) or len(word) < 7:
            return False
        if not any(_one_edit(word, w) for w in have):
            return False
    return True


def _one_edit(a: str, b: str) -> bool:
    """At most one substituted, inserted or deleted character between ``a`` and ``b``."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) <= 1
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k in range(len(short)) if short[k] != long_[k]), len(short))
    return short[i:] == long_[i + 1:]


def _seam_line(page: Page, block_text: str) -> bool:
    """A short line that may sit between the two parts of a clause broken by a page: a page number, a footnote
    marker, a legend or running header the furniture learner missed (it recurs on too few pages)."""
    words = block_text.split()
    return 0 < len(words) <= SEAM_SKIP_WORDS and "\n" not in block_text.strip()


def _seam_blocks(page: Page, at_end: bool) -> int:
    """How many of the page's last (``at_end``) or first blocks are skippable seam lines (at most 3)."""
    blocks = page.blocks[::-1] if at_end else page.blocks
    n = 0
    for block in blocks[:3]:
        if block.kind == "table" or not _seam_line(page, page.text[block.char_start:block.char_end]):
            break
        n += 1
    return n


def _bounds(page: Page, role: str, q_len: int) -> tuple[int, int] | None:
    """The part of a page's text a quote spanning the seam can touch: the tail of the first page, the head of the
    last, a whole middle page (None when that page is longer than the quote, so it cannot lie inside it)."""
    norm, idx = _normalized(page.text)
    reach = int(q_len * 1.5) + 50
    if role == "middle":
        return (0, len(page.text)) if len(norm) <= q_len else None
    if len(norm) <= reach:
        return 0, len(page.text)
    if role == "first":
        return idx[len(norm) - reach], len(page.text)
    return 0, idx[reach - 1] + 1


def _joined(pages: list[Page], skip_seams: bool, q_len: int) -> tuple[str, list[tuple[int, int, int, int]]] | None:
    """The pages' texts (only what a quote of ``q_len`` normalized characters across the seams can reach) joined by
    blank lines, and segments ``(joined_start, joined_end, page index, page offset)``.  ``skip_seams`` leaves out
    each inner page edge's seam lines; None when there is none, or when a middle page is longer than the quote."""
    text_parts: list[str] = []
    segments: list[tuple[int, int, int, int]] = []
    pos = 0
    skipped = False
    for k, page in enumerate(pages):
        role = "first" if k == 0 else ("last" if k == len(pages) - 1 else "middle")
        bounds = _bounds(page, role, q_len)
        if bounds is None:
            return None
        start, end = bounds
        if skip_seams:
            if k > 0 and (n := _seam_blocks(page, at_end=False)):
                start = max(start, page.blocks[n].char_start if n < len(page.blocks) else end)
                skipped = True
            if k < len(pages) - 1 and (n := _seam_blocks(page, at_end=True)):
                end = min(end, page.blocks[-n - 1].char_end if n < len(page.blocks) else start)
                skipped = True
        if start >= end:
            continue
        if text_parts:
            text_parts.append("\n\n")
            pos += 2
        text_parts.append(page.text[start:end])
        segments.append((pos, pos + end - start, k, start))
        pos += end - start
    if skip_seams and not skipped:
        return None
    return "".join(text_parts), segments


def _parts(pages: list[Page], segments: list[tuple[int, int, int, int]], start: int, end: int) -> list[CitationPart]:
    parts = []
    for j0, j1, k, off in segments:
        a, b = max(start, j0), min(end, j1)
        if a >= b:
            continue
        page = pages[k]
        s0, s1 = a - j0 + off, b - j0 + off
        while s0 < s1 and page.text[s0].isspace():
            s0 += 1
        while s1 > s0 and page.text[s1 - 1].isspace():
            s1 -= 1
        if s0 < s1:
            parts.append(CitationPart(page=page.number, char_start=s0, char_end=s1,
                                      bboxes=_blocks_touching(page, s0, s1), quote=page.text[s0:s1]))
    return parts


def find_across(pages: list[Page], quote: str, *, fuzzy: bool = True,
                threshold: float = FUZZY_THRESHOLD) -> Citation | None:
    """Find ``quote`` running over the consecutive ``pages`` (first to last): only a match that starts on the
    first page and ends on the last counts.  Tried with the pages' texts as they are, then without short lines
    at the page seams (see :func:`_seam_line`)."""
    if len(pages) < 2 or any((p.scanned and not p.ocr) or not p.text for p in pages):
        return None
    q = _normalized(quote)[0]
    if len(q) < MIN_QUOTE_CHARS:
        return None
    if any(p.ocr for p in pages):
        fuzzy, threshold = True, min(threshold, OCR_FUZZY_THRESHOLD)
    # cheap test first: a match starts in the first page's tail and ends in the last page's head, so (exact) the
    # quote's first and last characters are there, or (fuzzy) some 8-character piece of each half of it is
    reach = int(len(q) * 1.5) + 50
    head, tail = _normalized(pages[0].text)[0][-reach:], _normalized(pages[-1].text)[0][:reach]
    if not fuzzy and (q[:MIN_QUOTE_CHARS] not in head or q[-MIN_QUOTE_CHARS:] not in tail):
        return None
    half = len(q) // 2
    if fuzzy and not (any(q[i:i + 8] in head for i in range(0, max(1, half - 7), 4))
                      and any(q[i:i + 8] in tail for i in range(half, max(half + 1, len(q) - 7), 4))):
        return None
    for skip in (False, True):
        joined = _joined(pages, skip, len(q))
        if joined is None:
            continue
        text, segments = joined
        if segments[0][2] != 0 or segments[-1][2] != len(pages) - 1:
            continue
        t, idx = normalize(text)  # small: only what the quote can reach
        pos = t.find(q)
        hit: tuple[int, int, float] | None = (pos, pos + len(q), 1.0) if pos >= 0 else None
        if hit is None and fuzzy:
            hit = _fuzzy_find(q, t, threshold)
            if hit is not None and not _same_content_words(q, t[hit[0]:hit[1]]):
                hit = None
        if hit is None:
            continue
        start, end = idx[hit[0]], idx[hit[1] - 1] + 1
        parts = _parts(pages, segments, start, end)
        if len(parts) != len(pages):  # the match does not touch every page: a one-page search finds it
            continue
        first = parts[0]
        return Citation(page=first.page, page_end=parts[-1].page, char_start=first.char_start,
                        char_end=first.char_end, bboxes=first.bboxes, quote=" ".join(p.quote for p in parts),
                        verified=True, similarity=round(hit[2], 4),
                        source="ocr" if any(p.ocr for p in pages) else "text", parts=parts)
    return None


def _page_runs(order: list[tuple[int, bool]], by_number: dict[int, Page]) -> list[tuple[list[Page], bool]]:
    """Runs of 2..MAX_SPAN_PAGES consecutive pages inside the searched range, shortest first; a run is a
    'neighbour' run when it contains no cited page."""
    allowed = {n: moved for n, moved in order if n in by_number}
    runs = []
    for size in range(2, MAX_SPAN_PAGES + 1):
        for first in sorted(allowed):
            numbers = list(range(first, first + size))
            if all(n in allowed for n in numbers):
                runs.append(([by_number[n] for n in numbers], all(allowed[n] for n in numbers)))
    return runs


def _search_order(cited: Iterable[int], page_count: int, neighbours: int) -> list[tuple[int, bool]]:
    """(page number, is a neighbour) in search order: cited pages first, then nearest neighbours."""
    cited = list(dict.fromkeys(int(p) for p in cited))
    order: dict[int, bool] = {p: False for p in cited if 1 <= p <= page_count}
    for dist in range(1, max(0, neighbours) + 1):
        for p in cited:
            for q in (p - dist, p + dist):
                if 1 <= q <= page_count and q not in order:
                    order[q] = True
    return list(order.items())


def verify(
    document: Document,
    quote: str,
    pages: list[int],
    *,
    search_neighbours: int = 1,
    fuzzy: bool = True,
    threshold: float = FUZZY_THRESHOLD,
) -> Citation | None:
    """Find ``quote`` on the cited ``pages``, else within ``search_neighbours`` pages of them (models are often
    one page off; the citation records the page it is really on).  Exact matches anywhere in that range win
    over fuzzy ones; a fuzzy match on a cited page over one on a neighbour; otherwise the most similar wins.
    A quote found on no single page is searched across runs of 2..``MAX_SPAN_PAGES`` consecutive pages of that
    range (:func:`find_across`), exactly first, fuzzily only when no one-page fuzzy match exists."""
    if not quote or not pages:
        return None
    by_number = {p.number: p for p in document.pages}
    order = _search_order(pages, max([document.page_count, *by_number]), search_neighbours)
    candidates = [(by_number[n], moved) for n, moved in order if n in by_number]
    for page, moved in candidates:
        hit = find_quote(page, quote, fuzzy=False)
        if hit is not None and (hit.similarity >= 1.0 or not fuzzy):
            return hit.model_copy(update={"page_corrected": moved})
    runs = _page_runs(order, by_number)
    for run, moved in runs:
        hit = find_across(run, quote, fuzzy=False)
        if hit is not None:
            return hit.model_copy(update={"page_corrected": moved})
    if not fuzzy:
        return None
    for neighbours in (False, True):
        best: Citation | None = None
        for page, moved in candidates:
            if moved != neighbours:
                continue
            hit = find_quote(page, quote, fuzzy=True, threshold=threshold)
            if hit is not None and (best is None or hit.similarity > best.similarity):
                best = hit.model_copy(update={"page_corrected": moved})
        for run, moved in runs:
            if moved != neighbours or best is not None:  # a one-page match wins; runs are the costly fallback
                continue
            hit = find_across(run, quote, fuzzy=True, threshold=threshold)
            if hit is not None and (best is None or hit.similarity > best.similarity):
                best = hit.model_copy(update={"page_corrected": moved})
        if best is not None:
            return best
    return None
