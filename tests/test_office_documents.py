"""Word (.docx) through the contract agent: reading order, numbering, tables, header/footer, tracked changes and
comments kept visible; citations verified on the PDF rendering and naming the paragraph; refusals with codes.
The embedded store, the real TaskRunner and a scripted model that quotes the document."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import pymupdf
import pytest

from agents.base import InputRejected, SubmissionCheck
from agents.registry import build_registry
from agents.runner import RunnerOptions, TaskRunner
from connectors.model_client import ModelReply
from connectors.stores import open_stores
from connectors.stores.base import TaskSubmission
from engine.runtime.request import GenerateRequest, Usage
from pipelines.document.formats import prepare
from pipelines.document.reader import read_pdf
from pipelines.document.types import DocumentError
from tests.office_samples import DELETED, GOVERNING, INSERTED, TERMINATION, make_docx

OWNER = "key-office"


class QuoteModel:
    """Cites ``quotes`` (category -> text) on page 1 when the chunk contains them."""

    def __init__(self, quotes: dict[str, str], pages: dict[str, int] | None = None) -> None:
        self.quotes = quotes
        self.pages = pages or {}
        self.requests: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest) -> ModelReply:
        self.requests.append(request)
        user = [m for m in request.messages if m["role"] == "user"][-1]
        text = " ".join("".join(p.get("text", "") for p in user["content"] if isinstance(p, dict)).split())
        items = [{"category": k, "value": "Yes", "quote": q, "page": self.pages.get(k, 1)}
                 for k, q in self.quotes.items() if q in text]
        return ModelReply(text=json.dumps({"items": items}), finish_reason="stop",
                          usage=Usage(prompt_tokens=100, completion_tokens=10))


async def run_contract(tmp_path: Path, model: Any, input: dict[str, Any]) -> Any:
    stores = open_stores(f"sqlite:///{tmp_path}")
    runner = TaskRunner(stores, build_registry(), model, RunnerOptions(lease_s=30, retry_delay_s=0))
    await stores.tasks.submit(OWNER, TaskSubmission(type="contract_extraction", input=input))
    done = await runner.run_once()
    return stores, done


def _file(data: bytes, name: str) -> dict[str, Any]:
    return {"file": {"name": name, "data": base64.b64encode(data).decode()}}


def test_docx_reading_keeps_structure_and_tracked_changes() -> None:
    prepared = prepare(make_docx(), "msa.docx")
    text = read_pdf(prepared.pdf).pages[0].text
    assert prepared.kind == "docx" and prepared.title == "Master Supply Agreement"
    order = ["[header: CONFIDENTIAL", "1. Term and Termination", "1. Either party", "[comment by Dana",
             "2. Upon termination", f"[inserted by Bob: {INSERTED[:20]}", f"[deleted by Bob: {DELETED[:10]}",
             "| Widget | USD 12.00 |", "3. Governing Law", "3. This Agreement", "[footer: Page footer"]
    positions = [" ".join(text.split()).find(s) for s in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), list(zip(order, positions))
    labels = {a.label for a in prepared.anchors}
    assert {"paragraph 4", "table 1", "comment on paragraph 4", "header", "footer"} <= labels


def test_docx_through_the_contract_agent_cites_paragraphs(tmp_path: Path) -> None:
    async def main() -> None:
        model = QuoteModel({"governing_law": GOVERNING, "termination_for_convenience": TERMINATION,
                            "anti_assignment": "made up sentence that is nowhere in the contract"})
        stores, done = await run_contract(tmp_path, model, {**_file(make_docx(), "msa.docx"),
                                                            "categories": ["Governing Law",
                                                                           "Termination For Convenience",
                                                                           "Anti-Assignment"]})
        assert done.status == "succeeded", done.error
        result = done.result
        assert result["format"] == "docx" and result["title"] == "Master Supply Agreement"
        fields = {f["key"]: f for f in result["fields"]}
        law = fields["governing_law"]["values"][0]["citations"][0]
        assert law["verified"] and law["page"] == 1 and law["anchor"] == "paragraph 8"
        term = fields["termination_for_convenience"]["values"][0]["citations"][0]
        assert term["verified"] and term["anchor"] == "paragraph 4"
        assert not any(v["verified"] for v in fields["anti_assignment"]["values"])
        # the annotated output is the PDF rendering with one highlight per verified citation
        assert result["artifacts"]["annotated_pdf"]["filename"] == "msa.annotated.pdf"
        pdf = pymupdf.open(stream=await stores.blobs.get(OWNER, result["artifacts"]["annotated_pdf"]["ref"]),
                           filetype="pdf")
        subjects = {a.info["subject"] for page in pdf for a in page.annots() if a.type[1] == "Highlight"}
        assert {s.casefold() for s in subjects} == {"governing law", "termination for convenience"}
        # the model saw tracked changes marked as such
        prompt = " ".join(json.dumps(r.messages) for r in model.requests)
        assert "[inserted by Bob:" in prompt and "[deleted by Bob:" in prompt
        await stores.close()

    asyncio.run(main())


def _encrypted_docx() -> bytes:
    # what Word writes for a password-protected .docx: an OLE compound file with an EncryptedPackage stream
    return b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 500 + "EncryptedPackage".encode("utf-16-le") + b"\0" * 600


def _bomb() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("word/document.xml", "<w:document/>")
        z.writestr("word/media/huge.bin", b"\0" * (3 * 2**20))  # over the 2 MiB limit set below
    return out.getvalue()


@pytest.mark.parametrize("make, code", [
    (_encrypted_docx, "encrypted"),
    (lambda: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 1000, "unsupported_format"),
    (lambda: make_docx()[: len(make_docx()) // 2], "corrupt"),
    (lambda: make_docx().replace(b"word/document.xml", b"word/documenX.xml"), "corrupt"),
    (_bomb, "too_large"),
])
def test_bad_word_files_fail_with_a_code(tmp_path: Path, make: Any, code: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipelines.document.docx_reader.DEFAULT_MAX_UNZIPPED", 2 * 2**20)  # 200 MiB in service
    data = make()
    with pytest.raises(DocumentError) as info:
        prepare(data, "x.docx")
    assert info.value.code == code, info.value.message

    async def main() -> None:
        stores, done = await run_contract(tmp_path, QuoteModel({}), _file(data, "x.docx"))
        assert done.status == "failed" and done.error.code == code and done.attempts == 1, done.error
        await stores.close()

    asyncio.run(main())


def test_submission_accepts_word_and_refuses_other_zips() -> None:
    registry = build_registry()
    agent = registry.get("contract_extraction")

    async def check(data: bytes, name: str) -> None:
        await agent.check_submission(registry.validate("contract_extraction", _file(data, name)),
                                     SubmissionCheck(OWNER, None))  # type: ignore[arg-type]

    asyncio.run(check(make_docx(), "msa.docx"))
    xlsx = io.BytesIO()
    with zipfile.ZipFile(xlsx, "w") as z:
        z.writestr("xl/workbook.xml", "<workbook/>")
    with pytest.raises(InputRejected, match="Excel"):
        asyncio.run(check(xlsx.getvalue(), "book.xlsx"))
    with pytest.raises(InputRejected, match="PNG"):
        asyncio.run(check(b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "scan.png"))


@pytest.fixture(scope="module")
def small_contract():
    from pipelines.document.synthetic import make_contract

    return make_contract(pages=3, seed=1)


def test_eml_thread_in_time_order_with_safe_html_and_attachments(small_contract) -> None:
    from tests.office_samples import HTML_SECRET, LATE_TERMS, make_thread_eml

    prepared = prepare(make_thread_eml(small_contract.pdf), "thread.eml")
    text = " ".join(p.text for p in read_pdf(prepared.pdf).pages)
    flat = " ".join(text.split())
    assert prepared.kind == "eml" and prepared.title == "Re: MSA draft"
    # the forwarded original (2 March) comes before the reply (4 March) that contains it
    assert 0 <= flat.find("Message 1: MSA draft") < flat.find("Message 2: Re: MSA draft")
    assert "we accept. The signed contract is attached." in flat and LATE_TERMS in flat
    # no script, style or remote reference survives the HTML body
    assert HTML_SECRET not in flat and "evil.example" not in flat and "tracker.example" not in flat
    assert "color:red" not in flat
    # both attachments were read: the PDF's text and the Word file's tracked change
    assert "Attachment: signed-msa.pdf" in flat and "[inserted by Bob:" in flat
    labels = {a.label for a in prepared.anchors}
    from tests.office_samples import SCANNED_TEXT

    assert SCANNED_TEXT.lower() in flat.lower()  # the picture attachment was OCR'd
    assert {"message 1 body", "message 2 / attachment scan.png (OCR)", "message 2 / attachment signed-msa.pdf, page 1",
            "message 2 / attachment msa-v3.docx, paragraph 8"} <= labels


def test_eml_through_the_contract_agent_names_message_and_attachment(tmp_path: Path, small_contract) -> None:
    from tests.office_samples import LATE_TERMS, make_thread_eml

    gold = next(g for g in small_contract.gold if g.page not in small_contract.scanned_pages
                and 40 < len(g.text) < 250)
    from pipelines.document.cuad import to_key

    data = make_thread_eml(small_contract.pdf)
    rendered = read_pdf(prepare(data, "thread.eml").pdf)
    law_page = next(p.number for p in rendered.pages if GOVERNING in " ".join(p.text.split()))
    gold_page = next(p.number for p in rendered.pages if " ".join(gold.text.split()) in " ".join(p.text.split()))

    async def main() -> None:
        model = QuoteModel({to_key(gold.category): " ".join(gold.text.split()), "governing_law": GOVERNING,
                            "minimum_commitment": LATE_TERMS},
                           {"governing_law": law_page, to_key(gold.category): gold_page})
        categories = sorted({gold.category, "Governing Law", "Minimum Commitment"})
        stores, done = await run_contract(tmp_path, model, {**_file(data, "thread.eml"), "categories": categories})
        assert done.status == "succeeded", done.error
        fields = {f["key"]: f for f in done.result["fields"]}
        assert done.result["format"] == "eml"
        anchors = {k: [c["anchor"] for v in f["values"] for c in v["citations"] if c["verified"]]
                   for k, f in fields.items()}
        assert any(a and a.startswith("message 2 / attachment signed-msa.pdf, page")
                   for a in anchors[to_key(gold.category)]), anchors
        assert anchors["governing_law"] == ["message 2 / attachment msa-v3.docx, paragraph 8"], anchors
        assert anchors["minimum_commitment"] == ["message 1 body"], anchors
        await stores.close()

    asyncio.run(main())


def test_email_bombs_and_non_email_fail_with_codes(tmp_path: Path) -> None:
    from pipelines.document.email_reader import email_to_html
    from tests.office_samples import make_nested_eml, make_thread_eml

    with pytest.raises(DocumentError) as info:
        prepare(make_nested_eml(8), "deep.eml")
    assert info.value.code == "too_deep"
    assert prepare(make_nested_eml(3), "ok.eml").kind == "eml"
    with pytest.raises(DocumentError) as info:
        email_to_html(make_thread_eml(b"%PDF-1.4 " + b"x" * 5000), max_attachment_bytes=4000)
    assert info.value.code == "too_large"
    with pytest.raises(DocumentError) as info:
        email_to_html(make_nested_eml(3), max_parts=2)
    assert info.value.code == "too_large"

    async def main() -> None:
        stores, done = await run_contract(tmp_path, QuoteModel({}), _file(make_nested_eml(8), "deep.eml"))
        assert done.status == "failed" and done.error.code == "too_deep" and done.attempts == 1
        await stores.close()

    asyncio.run(main())
    with pytest.raises(InputRejected, match="e-mail"):
        registry = build_registry()
        asyncio.run(registry.get("contract_extraction").check_submission(
            registry.validate("contract_extraction", _file(b"just some text, no headers", "notes.txt")),
            SubmissionCheck(OWNER, None)))  # type: ignore[arg-type]
