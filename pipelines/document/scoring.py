"""CUAD-style scoring of extracted clauses against ground truth.

As in CUAD's evaluation, a predicted clause counts as correct when it is about the same category and its
text overlaps a gold clause enough: token Jaccard >= 0.5 after SQuAD-style normalization (lower case, no
punctuation, no articles), or any shared token in ``"overlap"`` mode.  We also check the page where both sides
know it, because a citation on the wrong page is wrong for a reviewer even if the words match.  Each gold
clause is matched at most once (greedily, best similarity first); exact duplicate predictions (the same
clause from overlapping chunks) are collapsed before scoring, any other extra prediction is a false positive.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from pipelines.document.cuad import to_key
from pipelines.document.types import GoldClause, PredictedClause

_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}\u2018\u2019\u201c\u201d\u2013\u2014]")


def tokens(text: str) -> list[str]:
    """SQuAD/CUAD answer normalization: lower case, punctuation and articles removed, split on whitespace."""
    text = unicodedata.normalize("NFKC", text).lower()
    return [t for t in _PUNCT.sub(" ", text).split() if t not in _ARTICLES]


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class PRF(BaseModel):
    precision: float
    recall: float
    f1: float


class CategoryScore(BaseModel):
    category: str  # canonical key
    gold: int
    predicted: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float


class Match(BaseModel):
    category: str
    prediction: int  # index into the predictions passed to score()
    gold: int  # index into the gold clauses passed to score()
    similarity: float


class ScoreReport(BaseModel):
    per_category: dict[str, CategoryScore]
    micro: PRF
    macro: PRF  # unweighted mean over categories that have gold clauses or predictions
    matches: list[Match] = Field(default_factory=list)
    match: Literal["overlap", "jaccard"]
    threshold: float
    page_must_match: bool

    def to_markdown(self) -> str:
        mode = "any token overlap" if self.match == "overlap" else f"token Jaccard ≥ {self.threshold:g}"
        lines = [
            f"Matching: {mode}" + (", same page" if self.page_must_match else ""),
            "",
            "| Category | Gold | Pred | TP | FP | FN | P | R | F1 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in sorted(self.per_category.values(), key=lambda c: c.category):
            lines.append(
                f"| {c.category} | {c.gold} | {c.predicted} | {c.tp} | {c.fp} | {c.fn} "
                f"| {c.precision:.3f} | {c.recall:.3f} | {c.f1:.3f} |"
            )
        tp = sum(c.tp for c in self.per_category.values())
        fp = sum(c.fp for c in self.per_category.values())
        fn = sum(c.fn for c in self.per_category.values())
        gold, pred = tp + fn, tp + fp
        m, a = self.micro, self.macro
        lines.append(f"| **micro** | {gold} | {pred} | {tp} | {fp} | {fn} "
                     f"| {m.precision:.3f} | {m.recall:.3f} | {m.f1:.3f} |")
        lines.append(f"| **macro** | | | | | | {a.precision:.3f} | {a.recall:.3f} | {a.f1:.3f} |")
        return "\n".join(lines) + "\n"


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Undefined ratios (nothing predicted / nothing to find) count as 0, like sklearn's zero_division=0."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def score(
    predictions: list[PredictedClause],
    gold: list[GoldClause],
    *,
    match: Literal["overlap", "jaccard"] = "jaccard",
    threshold: float = 0.5,
    page_must_match: bool = True,
) -> ScoreReport:
    """Per-category precision/recall/F1 plus micro and macro averages.  Categories are compared by key, so
    CUAD names ("Governing Law") and keys ("governing_law") can be mixed."""
    if match not in ("overlap", "jaccard"):
        raise ValueError(f"match must be 'overlap' or 'jaccard', got {match!r}")
    # Collapse exact duplicates (same category, normalized text and page), keeping the first index.
    seen: set[tuple[str, tuple[str, ...], int | None]] = set()
    preds: list[tuple[int, str, set[str], int | None]] = []
    for i, p in enumerate(predictions):
        cat, toks = to_key(p.category), tokens(p.text)
        if (cat, tuple(toks), p.page) in seen:
            continue
        seen.add((cat, tuple(toks), p.page))
        preds.append((i, cat, set(toks), p.page))
    golds = [(j, to_key(g.category), set(tokens(g.text)), g.page) for j, g in enumerate(gold)]

    candidates: list[tuple[float, int, int, str]] = []
    for i, pcat, ptoks, ppage in preds:
        for j, gcat, gtoks, gpage in golds:
            if pcat != gcat:
                continue
            if page_must_match and ppage is not None and gpage is not None and ppage != gpage:
                continue
            sim = jaccard(ptoks, gtoks)
            ok = bool(ptoks & gtoks) if match == "overlap" else sim >= threshold
            if ok:
                candidates.append((sim, i, j, pcat))
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    used_p: set[int] = set()
    used_g: set[int] = set()
    matches: list[Match] = []
    for sim, i, j, cat in candidates:
        if i in used_p or j in used_g:
            continue
        used_p.add(i)
        used_g.add(j)
        matches.append(Match(category=cat, prediction=i, gold=j, similarity=round(sim, 4)))

    cats = sorted({c for _, c, _, _ in preds} | {c for _, c, _, _ in golds})
    per: dict[str, CategoryScore] = {}
    for cat in cats:
        n_gold = sum(1 for g in golds if g[1] == cat)
        n_pred = sum(1 for p in preds if p[1] == cat)
        tp = sum(1 for m in matches if m.category == cat)
        p, r, f = _prf(tp, n_pred - tp, n_gold - tp)
        per[cat] = CategoryScore(category=cat, gold=n_gold, predicted=n_pred, tp=tp, fp=n_pred - tp,
                                 fn=n_gold - tp, precision=p, recall=r, f1=f)
    micro = _prf(len(matches), len(preds) - len(matches), len(golds) - len(matches))
    k = len(per) or 1
    macro = tuple(sum(getattr(c, a) for c in per.values()) / k for a in ("precision", "recall", "f1"))
    return ScoreReport(
        per_category=per,
        micro=PRF(precision=micro[0], recall=micro[1], f1=micro[2]),
        macro=PRF(precision=macro[0], recall=macro[1], f1=macro[2]),
        matches=matches,
        match=match,
        threshold=threshold,
        page_must_match=page_must_match,
    )


def load_cuad_json(path_or_obj: str | Path | dict[str, Any]) -> dict[str, list[GoldClause]]:
    """Gold clauses per contract title from CUAD's SQuAD-format JSON (``CUAD_v1.json``, ``test.json``).

    A question's id is ``"<contract>__<Category Name>"``; each answer becomes a :class:`GoldClause` with the
    category name, the answer text and ``answer_start`` (CUAD has no page numbers).  Repeated answers are
    kept once.
    """
    data = path_or_obj
    if not isinstance(data, dict):
        with Path(data).open(encoding="utf-8") as f:
            data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError('not a CUAD/SQuAD JSON document: expected {"data": [...]}')
    out: dict[str, list[GoldClause]] = {}
    for contract in data["data"]:
        title = str(contract.get("title", ""))
        clauses = out.setdefault(title, [])
        seen: set[tuple[str, str, int | None]] = set()
        for para in contract.get("paragraphs", []):
            for qa in para.get("qas", []):
                qid = str(qa.get("id", ""))
                if "__" not in qid:
                    raise ValueError(f"CUAD question id without '__<Category>': {qid!r}")
                category = qid.rsplit("__", 1)[1].strip()
                for ans in qa.get("answers", []):
                    text, start = str(ans.get("text", "")), ans.get("answer_start")
                    if not text.strip() or (category, text, start) in seen:
                        continue
                    seen.add((category, text, start))
                    clauses.append(GoldClause(category=category, text=text, start=start))
    return out


def load_master_clauses(path: str | Path) -> dict[str, list[GoldClause]]:
    """Gold clauses per contract from CUAD's ``master_clauses.csv``: keyed by the ``Filename`` column lower-cased
    without its extension; each category column holds the clause texts as a Python list literal (``-Answer``
    columns are CUAD's normalised answers and are skipped).  CUAD joins the pieces of a discontinuous clause with
    ``<omitted>``; the text is kept as CUAD has it (see :func:`clause_parts`)."""
    import ast
    import csv

    out: dict[str, list[GoldClause]] = {}
    with Path(path).open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            name = str(row.get("Filename") or "").strip()
            if not name:
                continue
            clauses = out.setdefault(Path(name).stem.lower(), [])
            for column, cell in row.items():
                if column in (None, "Filename") or "answer" in column.lower() or not cell or not cell.startswith("["):
                    continue
                try:
                    texts = ast.literal_eval(cell)
                except (ValueError, SyntaxError):
                    continue
                for text in texts if isinstance(texts, list) else []:
                    if isinstance(text, str) and text.strip():
                        clauses.append(GoldClause(category=column.strip(), text=text))
    return out


def clause_parts(text: str) -> list[str]:
    """The contiguous pieces of a CUAD clause (CUAD writes ``<omitted>`` where it left text out)."""
    return [p.strip() for p in text.split("<omitted>") if p.strip()]


class CurvePoint(BaseModel):
    threshold: float
    precision: float
    recall: float


def pr_curve(contracts: list[tuple[list[PredictedClause], list[float], list[GoldClause]]],
             **score_options: Any) -> list[CurvePoint]:
    """Precision/recall over all contracts as the confidence threshold falls through every predicted
    confidence (CUAD's way of scoring systems that rank their answers); matching as :func:`score`."""
    thresholds = sorted({c for _, confs, _ in contracts for c in confs}, reverse=True)
    gold_total = sum(len(g) for _, _, g in contracts)
    points: list[CurvePoint] = []
    for t in thresholds:
        tp = fp = 0
        for preds, confs, gold in contracts:
            kept = [p for p, c in zip(preds, confs) if c >= t]
            if not kept:
                continue
            report = score(kept, gold, **score_options)
            tp += sum(c.tp for c in report.per_category.values())
            fp += sum(c.fp for c in report.per_category.values())
        points.append(CurvePoint(threshold=t, precision=tp / (tp + fp) if tp + fp else 0.0,
                                 recall=tp / gold_total if gold_total else 0.0))
    return points


def aupr(points: list[CurvePoint]) -> float:
    """Area under the precision-recall curve (step-wise, precision interpolated to the right as in CUAD)."""
    area, last_recall = 0.0, 0.0
    pts = sorted(points, key=lambda p: p.recall)
    for i, p in enumerate(pts):
        best = max(q.precision for q in pts[i:])
        area += (p.recall - last_recall) * best
        last_recall = p.recall
    return area


def precision_at_recall(points: list[CurvePoint], recall: float) -> float:
    """Best precision at a threshold that reaches ``recall`` (0 when no threshold does)."""
    return max((p.precision for p in points if p.recall >= recall), default=0.0)
