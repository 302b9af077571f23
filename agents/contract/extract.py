"""Map (one guided model call per chunk, every quote checked against its page) and reduce (merge values across
chunks and passes, keep every citation)."""

from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel

from agents.contract import confidence
from agents.contract.inputs import ContractInput
from pipelines.document.annotate import AnnotatedItem
from pipelines.document.citations import Citation, verify
from pipelines.document.report import ContractResult, ExtractedValue, FieldResult
from pipelines.document.types import Document


class ChunkStats(BaseModel):
    index: int
    pages: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    items: int
    verified: int

    @staticmethod
    def summary(stats: list["ChunkStats"], window: int) -> dict[str, Any]:
        """Model calls, tokens per page and how full each call's context was (this attempt's calls)."""
        if not stats:
            return {"model_calls": 0}
        pages = sum(s.pages for s in stats)
        fills = [(s.prompt_tokens + s.completion_tokens) / window for s in stats]
        return {
            "model_calls": len(stats),
            "prompt_tokens": sum(s.prompt_tokens for s in stats),
            "completion_tokens": sum(s.completion_tokens for s in stats),
            "tokens_per_page": round(sum(s.prompt_tokens + s.completion_tokens for s in stats) / max(1, pages), 1),
            "context_fill_mean": round(sum(fills) / len(fills), 3),
            "context_fill_max": round(max(fills), 3),
            "model_seconds": round(sum(s.seconds for s in stats), 2),
            "items": sum(s.items for s in stats),
            "verified_items": sum(s.verified for s in stats),
        }


def chunk_pages(chunk: Any) -> list[int]:
    return sorted({p.meta["page"] for p in chunk.pieces if "page" in p.meta})


async def extract_chunk(ctx: Any, document: Document, chunk: Any, group: Any,
                        input: ContractInput) -> tuple[dict[str, Any], ChunkStats]:
    pages = chunk_pages(chunk)
    schema = group.schema_for(input, (pages[0], pages[-1]) if pages else (1, document.page_count))
    started = time.monotonic()
    reply = await ctx.chat(chunk.messages(), json_schema=schema, max_tokens=input.max_output_tokens,
                           temperature=0.0, logprobs=0)
    seconds = time.monotonic() - started
    warnings: list[str] = []
    try:
        raw_items = json.loads(reply.text).get("items", [])
    except (ValueError, AttributeError):
        raw_items = []
        warnings.append(f"chunk {chunk.index}: output not complete JSON (finish: {reply.finish_reason}); "
                        f"raise max_output_tokens")
    items = []
    value_logprobs = confidence.item_logprobs(reply.text, getattr(reply, "logprobs", None), len(raw_items))
    for raw, logprob in zip(raw_items, value_logprobs):
        if not isinstance(raw, dict) or raw.get("category") not in group.keys:
            continue
        quote, page = str(raw.get("quote") or ""), raw.get("page")
        citation = verify(document, quote, [int(page)]) if isinstance(page, int) else None
        if citation is None and isinstance(page, int):
            citation = Citation.unverified(page, quote)
        items.append({"key": raw["category"], "value": raw.get("value"), "chunk": chunk.index,
                      "logprob": logprob, "citation": citation.model_dump(mode="json") if citation else None})
    usage = reply.usage
    stats = ChunkStats(index=chunk.index, pages=len(pages), prompt_tokens=usage.prompt_tokens if usage else 0,
                       completion_tokens=usage.completion_tokens if usage else 0, seconds=seconds,
                       items=len(items), verified=sum(bool(i["citation"] and i["citation"]["verified"])
                                                      for i in items))
    return {"items": items, "warnings": warnings, "chunk": chunk.index, "pages": pages,
            "keys": sorted(group.keys)}, stats


def _value_key(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    return " ".join(text.split()).casefold()


def _agreement(value: ExtractedValue, key: str, chunk_pages_seen: list[tuple[Any, set[int], set[str]]]) -> float:
    """Share of the chunks that looked for ``key`` on the value's cited pages which produced the value (1.0 when
    unknown, e.g. chunk results stored by an older version)."""
    pages = {p for c in value.citations if c.verified for p in c.pages} or {c.page for c in value.citations}
    saw = {chunk for chunk, seen, keys in chunk_pages_seen if chunk is not None and seen & pages and key in keys}
    if not saw:
        return 1.0
    return min(1.0, len(saw & set(value.sources)) / len(saw))


class ContractOutcome(BaseModel):
    result: ContractResult
    data: dict[str, Any]  # key -> best value (the user's schema shape, or CUAD key -> value)

    def annotated_items(self) -> list[AnnotatedItem]:
        return [AnnotatedItem(label=f.name, value=v.value, citations=[c for c in v.citations if c.verified])
                for f in self.result.fields for v in f.values if any(c.verified for c in v.citations)]

    def public(self) -> dict[str, Any]:
        return {**self.result.model_dump(mode="json"), "data": self.data}


def merge_results(document: Document, targets: list[Any], chunk_results: list[dict[str, Any]],
                  input: ContractInput, *, chunks: int) -> ContractOutcome:
    """Same value (whitespace/case-insensitive) from several chunks -> one value with all citations; different
    values for one target are all kept (a conflict is visible, not resolved silently), best-supported first."""
    by_key: dict[str, dict[str, ExtractedValue]] = {t.key: {} for t in targets}
    logprobs: dict[int, list[float | None]] = {}  # id(value) -> its items' value log-probabilities
    warnings: list[str] = []
    chunk_pages_seen = [(r.get("chunk"), set(r.get("pages") or []), set(r.get("keys") or [])) for r in chunk_results]
    for result in chunk_results:
        warnings.extend(result.get("warnings", []))
        for item in result.get("items", []):
            values = by_key.get(item["key"])
            if values is None:
                continue
            citation = Citation.model_validate(item["citation"]) if item.get("citation") else None
            slot = values.setdefault(_value_key(item["value"]), ExtractedValue(value=item["value"]))
            logprobs.setdefault(id(slot), []).append(item.get("logprob"))
            if item["chunk"] not in slot.sources:
                slot.sources.append(item["chunk"])
            if citation is not None and not any(
                    (c.page, c.char_start, c.char_end, c.quote) == (citation.page, citation.char_start,
                                                                     citation.char_end, citation.quote)
                    for c in slot.citations):
                slot.citations.append(citation)
            slot.verified = any(c.verified for c in slot.citations)
    if document.ocr_skipped:
        warnings.append(f"{document.ocr_skipped} scanned page(s) were not OCR'd (max_ocr_pages / ocr_time_s reached): "
                        "the model read their images, but quotes from them cannot be verified")
    dropped = low = 0
    fields: list[FieldResult] = []
    data: dict[str, Any] = {}
    for target in targets:
        values = list(by_key[target.key].values())
        for v in values:
            v.confidence = confidence.score(logprobs.get(id(v), []), _agreement(v, target.key, chunk_pages_seen),
                                            confidence.verification_factor(v.citations))
        if input.unverified == "drop":
            dropped += sum(not v.verified for v in values)
            values = [v for v in values if v.verified]
        if input.min_confidence > 0:
            low += sum((v.confidence or 0.0) < input.min_confidence for v in values)
            values = [v for v in values if (v.confidence or 0.0) >= input.min_confidence]
        values.sort(key=lambda v: (-sum(c.verified for c in v.citations), -(v.confidence or 0.0), -len(v.sources)))
        for v in values:
            v.citations.sort(key=lambda c: (not c.verified, c.page))
        fields.append(FieldResult(key=target.key, name=target.name, values=values))
        data[target.key] = values[0].value if values else None
    result = ContractResult(document_sha256=document.sha256, title=document.title, page_count=document.page_count,
                            fields=fields, unverified_dropped=dropped, low_confidence_dropped=low, chunks=chunks,
                            schema_kind="user" if input.json_schema is not None else "cuad",
                            warnings=sorted(set(warnings)))
    return ContractOutcome(result=result, data=data)
