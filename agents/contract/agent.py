"""The ``contract_extraction`` agent: read -> plan -> map (guided extraction per chunk) -> verify -> reduce ->
annotated PDF + Markdown summary; the task's session keeps the findings for follow-up questions.

Why this shape: a contract of hundreds of pages never fits one call, so the context planner cuts it along
section boundaries (with overlap, so a clause split by a cut is seen whole once); each chunk's output is
constrained to a JSON schema (no malformed answers, even from a weak model); every value must quote its source,
and a quote that is not on the cited page (±1) is never reported as a citation. Chunk results are persisted in
child sessions, so a runner that dies mid-document costs only the chunk in flight.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agents.base import Agent, AgentContext, AgentError, InputRejected, SubmissionCheck
from agents.contract.extract import ChunkStats, extract_chunk, merge_results
from agents.contract.inputs import ContractInput
from agents.contract.schema import build_targets, plan_groups
from agents.registry import register_agent
from agents.sources import file_kind, load_source, source_head


async def prepare_document(data: bytes, name: str, input: ContractInput) -> Any:
    """A Word file or an e-mail rendered to PDF (a PDF as it is), in a thread; refusals as ``AgentError``."""
    from pipelines.document.formats import prepare
    from pipelines.document.types import DocumentError

    try:
        return await asyncio.to_thread(prepare, data, name, max_pages=input.max_pages)
    except DocumentError as exc:
        raise AgentError(exc.message, code=exc.code) from None


def label_citations(outcome: Any, anchors: list[Any]) -> None:
    """Word/e-mail input: each verified citation names the paragraph (message, attachment) it came from."""
    from pipelines.document.render import anchor_for

    if not anchors:
        return
    for field in outcome.result.fields:
        for value in field.values:
            for citation in value.citations:
                if citation.verified:
                    citation.anchor = anchor_for(anchors, citation.quote)


async def read_document(ctx: AgentContext, data: bytes, input: ContractInput) -> Any:
    """PyMuPDF work (OCR of scanned pages included) runs in a thread (the heartbeat keeps beating); page progress,
    with the count of OCR'd pages, is sent at most every 0.5 s."""
    from pipelines.document.reader import open_pdf
    from pipelines.document.types import DocumentError

    loop = asyncio.get_running_loop()
    last = [0.0]

    reader: list[Any] = []

    def on_page(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5 or done == total:
            last[0] = now
            ocr_pages = reader[0].ocr_pages if reader else 0
            asyncio.run_coroutine_threadsafe(ctx.emit("reading", {"page": done, "pages": total,
                                                                  "ocr_pages": ocr_pages}), loop)

    def read() -> Any:
        with open_pdf(data, password=input.password, max_pages=input.max_pages, truncate=input.truncate,
                      ocr=input.ocr, max_ocr_pages=input.max_ocr_pages, ocr_time_s=input.ocr_time_s) as opened:
            reader.append(opened)
            return opened.document(on_page)

    try:
        return await asyncio.to_thread(read)
    except DocumentError as exc:
        raise AgentError(exc.message, code=exc.code) from None


async def _is_word_package(check: SubmissionCheck, input: ContractInput) -> bool:
    """Whether a ZIP input (inline or uploaded) lists word/document.xml; a damaged ZIP passes (the reader's
    ``corrupt`` error then says what is wrong when the task runs)."""
    import io
    import zipfile

    data = input.file.bytes() if input.file is not None else await check.blob(input.blob or "")
    try:
        with zipfile.ZipFile(io.BytesIO(data or b"")) as z:
            return "word/document.xml" in z.namelist()
    except (zipfile.BadZipFile, ValueError, OSError):
        return True


@register_agent
class ContractExtractionAgent(Agent):
    type = "contract_extraction"
    Input = ContractInput

    @classmethod
    async def check_submission(cls, input: ContractInput, check: SubmissionCheck) -> None:
        """A file or blob that is not a PDF, a Word .docx or an e-mail (a scan as PNG, an .xlsx) is refused at
        the door."""
        from pipelines.document.formats import sniff

        got = await source_head(check, input.file, input.blob)
        if got is None:
            return
        name = input.file.name if input.file is not None else ""
        kind_found = sniff(got[0], name)
        if kind_found == "docx" and got[0].startswith(b"PK") and not await _is_word_package(check, input):
            raise InputRejected("the contract must be a PDF, a Word .docx or an e-mail .eml; this file is a ZIP "
                                "archive without word/document.xml (e.g. an Excel .xlsx or a plain .zip)", got[1])
        if kind_found == "unknown":
            kind = file_kind(got[0])
            what = "empty" if kind == "empty" else (kind or "not a PDF (no %PDF- header)")
            raise InputRejected(f"the contract must be a PDF, a Word .docx or an e-mail .eml; this file is {what}",
                                got[1])
    description = ("Long contracts (PDF, Word .docx, e-mail .eml with attachments) -> CUAD's 41 clause categories "
                   "or your JSON schema, each value with verified page citations (and, for Word/e-mail, the "
                   "paragraph/message/attachment); annotated PDF and Markdown summary as artifacts.")

    async def run(self, ctx: AgentContext, input: ContractInput) -> dict[str, Any]:
        from pipelines.document.annotate import annotate_pdf
        from pipelines.document.report import markdown_summary
        from pipelines.map_reduce import map_reduce

        await ctx.step("load")
        data, name = await load_source(ctx, input.file, input.url, input.blob, max_bytes=200 * 2**20,
                                       what="document", default_name="document.pdf")
        prepared = await prepare_document(data, name, input)
        await ctx.step("read", bytes=len(data), format=prepared.kind)
        data = prepared.pdf  # a Word file / e-mail is read, cited and annotated as its PDF rendering
        document = await read_document(ctx, data, input)
        if prepared.title and not document.title:
            document.title = prepared.title
        scanned = sum(p.scanned for p in document.pages)
        await ctx.emit("document", {"pages": document.page_count, "scanned_pages": scanned,
                                    "ocr_pages": document.ocr_pages, "ocr_skipped": document.ocr_skipped,
                                    "sections": len(document.sections), "title": document.title})

        await ctx.step("plan")
        targets = build_targets(input)
        groups = await asyncio.to_thread(plan_groups, document, targets, input, ctx.resources)
        total = sum(len(g.chunks) for g in groups)
        await ctx.emit("planned", {"groups": len(groups), "chunks": total,
                                   "chunk_tokens": [c.token_count for g in groups for c in g.chunks]})
        stats: list[ChunkStats] = []
        done = [0]
        results: list[Any] = []
        for g, group in enumerate(groups):
            parent = f"{ctx.session_id}.g{g}"
            await ctx.sessions.create(ctx.owner, session_id=parent, parent_id=ctx.session_id,
                                      metadata={"kind": "category_group", "keys": [t.key for t in group.targets]})

            async def map_fn(chunk: Any, child_session_id: str, group: Any = group) -> dict[str, Any]:
                out, chunk_stats = await extract_chunk(ctx, document, chunk, group, input)
                stats.append(chunk_stats)
                return out

            async def on_done(index: int, of: int, reused: bool) -> None:
                done[0] += 1
                await ctx.progress(done[0], total, f"chunk {done[0]}/{total}{' (reused)' if reused else ''}")

            outcome = await map_reduce(ctx.sessions, ctx.owner, parent, group.chunks, map_fn, lambda r: r,
                                       on_chunk_done=on_done, should_stop=lambda: ctx.cancel_requested)
            results.extend(outcome.result)

        await ctx.step("reduce")
        result = merge_results(document, targets, results, input, chunks=total)
        label_citations(result, prepared.anchors)
        await ctx.step("outputs")
        annotated = await asyncio.to_thread(annotate_pdf, data, result.annotated_items(), password=input.password)
        summary = markdown_summary(result.result)
        pdf_ref = await ctx.blobs.put(ctx.owner, annotated, "application/pdf")
        md_ref = await ctx.blobs.put(ctx.owner, summary.encode(), "text/markdown")
        memory = await asyncio.to_thread(followup_context, result, summary, name, ctx.resources)
        await ctx.remember([{"role": "system", "content": memory}])
        payload = result.public()
        payload["artifacts"] = {
            "annotated_pdf": {**pdf_ref.model_dump(), "filename": name.rsplit(".", 1)[0] + ".annotated.pdf"},
            "summary_md": {**md_ref.model_dump(), "filename": name.rsplit(".", 1)[0] + ".summary.md"},
        }
        payload["stats"] = ChunkStats.summary(stats, ctx.resources.context_window)
        payload["session_id"] = ctx.session_id
        payload["format"] = prepared.kind
        return payload


def followup_context(result: Any, summary: str, name: str, resources: Any, share: float = 0.5) -> str:
    """The session's memory of this contract: what was found and where, for follow-up questions, within
    ``share`` of the model's window."""
    head = (f"You answer questions about the contract {name!r} ({result.result.page_count} pages). These clauses "
            "were extracted with page citations; cite pages in your answers and say so when something was not "
            "found.")
    return resources.fit_lines(head + "\n\n" + summary, share, keep_head=2,
                               note="(summary cut to fit the context; see the task result for all)")
