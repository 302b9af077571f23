"""A confidence in [0, 1] per extracted value, from three signals the pipeline has anyway.

1. **Token probability**: the geometric mean of the probabilities the model gave the tokens of the value itself
   (``exp`` of their mean log-probability, under the guided-decoding mask), taken from the reply's logprobs.
2. **Chunk agreement**: of the chunks that saw the page(s) the value is cited on (chunks overlap), the share that
   produced the same value.
3. **Verification**: 1 for an exact citation, the fuzzy similarity for a fuzzy one, ``UNVERIFIED_FACTOR`` when no
   quote was found in the document.

``confidence = token_probability * agreement * verification``.  It is a ranking score (what CUAD's AUPR and
precision-at-recall need), not a calibrated probability: a model can be sure and wrong, and a value seen by only one
chunk gets full agreement by default.  When the model client returns no logprobs the first factor is left out.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from typing import Any, Sequence

UNVERIFIED_FACTOR = 0.3

_VALUE_KEY = re.compile(r'(?<!\\)"value"\s*:\s*')


def value_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of each item's ``"value"`` in a reply ``{"items": [{"category", "value", ...}, ...]}``, in
    order.  Each value is skipped whole (a nested ``"value"`` key inside an object value is not counted)."""
    spans: list[tuple[int, int]] = []
    decoder = json.JSONDecoder()
    pos = 0
    while (m := _VALUE_KEY.search(text, pos)) is not None:
        try:
            _, end = decoder.raw_decode(text, m.end())
        except ValueError:
            break
        spans.append((m.end(), end))
        pos = end
    return spans


def token_char_ends(logprobs: Sequence[Any]) -> list[int] | None:
    """Character offset, in the decoded reply, after each generated token (tokens are byte pieces: one character
    can span tokens, and invalid UTF-8 decodes to U+FFFD as the detokenizer does); None without token bytes."""
    if not logprobs or any(getattr(lp, "token_bytes", None) is None for lp in logprobs):
        return None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ends, length = [], 0
    for i, lp in enumerate(logprobs):
        length += len(decoder.decode(lp.token_bytes, final=i == len(logprobs) - 1))
        ends.append(length)
    return ends


def span_logprob(text: str, logprobs: Sequence[Any] | None, span: tuple[int, int]) -> float | None:
    """Mean log-probability of the generated tokens overlapping ``span`` (characters of ``text``); None when
    the tokens do not spell ``text`` (no logprobs, or output the detokenizer changed; a trailing stop token is
    allowed)."""
    ends = token_char_ends(logprobs or [])
    if ends is None or ends[-1] < len(text):
        return None
    # the last token may be the stop token, whose bytes are not part of the reply text
    if b"".join(lp.token_bytes for lp in logprobs or []).decode("utf-8", "replace")[: len(text)] != text:
        return None
    picked, start = [], 0
    for lp, end in zip(logprobs or [], ends):
        if end > span[0] and start < span[1] and math.isfinite(lp.logprob):
            picked.append(lp.logprob)
        start = end
    return sum(picked) / len(picked) if picked else None


def item_logprobs(text: str, logprobs: Sequence[Any] | None, count: int) -> list[float | None]:
    """The mean value log-probability of each of ``count`` parsed items (None where unknown)."""
    spans = value_spans(text) if logprobs else []
    if len(spans) != count:
        return [None] * count
    return [span_logprob(text, logprobs, s) for s in spans]


def score(logprobs: Sequence[float | None], agreement: float, verification: float) -> float:
    """The value's confidence from its items' log-probabilities (one per chunk that produced it), its chunk
    agreement and its verification factor."""
    known = [lp for lp in logprobs if lp is not None]
    token_p = math.exp(sum(known) / len(known)) if known else 1.0
    return round(max(0.0, min(1.0, token_p * agreement * verification)), 4)


def verification_factor(citations: Sequence[Any]) -> float:
    best = max((c.similarity for c in citations if c.verified), default=None)
    return UNVERIFIED_FACTOR if best is None else float(best)
