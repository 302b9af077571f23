"""The contract agent's result, and a Markdown summary of it for people (chat answers, review tickets).

Every value carries its citations; a value whose quotes could not be found in the document is kept only when
the agent chooses to, flagged ``verified=False``, and the summary marks it so a reader never mistakes it for
a checked answer.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field

from pipelines.document.citations import Citation
from pipelines.document.cuad import load_categories

QUOTE_CHARS = 160  # quotes longer than this are shortened in the summary


class ExtractedValue(BaseModel):
    value: Any
    citations: list[Citation] = Field(default_factory=list)
    verified: bool = False  # at least one citation was found in the document
    confidence: float | None = None
    sources: list[int] = Field(default_factory=list)  # indices of the chunks that produced this value


class FieldResult(BaseModel):
    key: str  # category key ("governing_law") or user field key
    name: str  # "Governing Law"
    values: list[ExtractedValue] = Field(default_factory=list)


class ContractResult(BaseModel):
    document_sha256: str
    title: str | None = None
    page_count: int
    fields: list[FieldResult] = Field(default_factory=list)
    unverified_dropped: int = 0  # values dropped because none of their quotes was found
    low_confidence_dropped: int = 0  # values dropped because their confidence was under min_confidence
    chunks: int = 0
    schema_kind: Literal["cuad", "user"] = "cuad"
    warnings: list[str] = Field(default_factory=list)


def _one_line(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _value(value: Any) -> str:
    if isinstance(value, str):
        return _one_line(value, 300)
    return _one_line(json.dumps(value, ensure_ascii=False, default=str), 300)


def _citation_line(c: Citation) -> str:
    pages = f"pp. {c.page}–{c.page_end}" if c.page_end and c.page_end != c.page else f"p. {c.page}"
    where = f"{pages} — “{_one_line(c.quote, QUOTE_CHARS)}”"
    if not c.verified:
        return f"⚠ unverified: {where} (quote not found in the document)"
    notes = []
    if c.page_corrected:
        notes.append("page corrected")
    if c.similarity < 1.0:
        notes.append(f"approximate match {c.similarity:.0%}")
    if c.source == "ocr":
        notes.append("OCR text")
    return where + (f" ({', '.join(notes)})" if notes else "")


def _not_found(result: ContractResult) -> list[str]:
    names = [f.name for f in result.fields if not f.values]
    if result.schema_kind == "cuad":  # categories the agent did not even list were not found either
        listed = {f.key for f in result.fields}
        names += [c.name for c in load_categories() if c.key not in listed]
    return names


def markdown_summary(result: ContractResult) -> str:
    """Title and size, then each found field with its values and citations, then what was not found."""
    lines = [f"# {_one_line(result.title or 'Untitled contract', 200)}", ""]
    schema = "CUAD categories" if result.schema_kind == "cuad" else "user schema"
    lines.append(
        f"{result.page_count} page{'s' if result.page_count != 1 else ''} · {result.chunks} "
        f"chunk{'s' if result.chunks != 1 else ''} · {schema} · sha256 `{result.document_sha256[:12]}`"
    )
    found = [f for f in result.fields if f.values]
    lines += ["", "## Found", ""]
    if not found:
        lines.append("Nothing was found.")
    for f in found:
        lines.append(f"### {f.name}")
        for v in f.values:
            extra = [] if v.verified else ["unverified"]
            if v.confidence is not None:
                extra.append(f"confidence {v.confidence:.2f}")
            mark = "" if v.verified else "⚠ "
            lines.append(f"- {mark}**{_value(v.value)}**" + (f" ({', '.join(extra)})" if extra else ""))
            lines += [f"  - {_citation_line(c)}" for c in v.citations]
        lines.append("")
    missing = _not_found(result)
    if missing:
        lines += ["## Not found", "", ", ".join(missing), ""]
    if result.unverified_dropped:
        n = result.unverified_dropped
        lines += [f"{n} value{'s' if n != 1 else ''} dropped: {'their quotes were' if n != 1 else 'its quote was'} "
                  "not found in the document.", ""]
    if result.low_confidence_dropped:
        n = result.low_confidence_dropped
        lines += [f"{n} value{'s' if n != 1 else ''} below the requested minimum confidence dropped.", ""]
    if result.warnings:
        lines += ["## Warnings", ""] + [f"- {_one_line(w, 300)}" for w in result.warnings] + [""]
    return "\n".join(lines).rstrip() + "\n"
