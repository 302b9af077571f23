"""The contract extraction agent's logic with a scripted model that quotes what is really in each chunk (plus a
hallucinated quote), on generated contracts; the embedded store and the real TaskRunner."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path
from typing import Any

import pymupdf
import pytest

from agents.registry import build_registry
from agents.runner import RunnerOptions, TaskRunner
from connectors.model_client import ModelReply, ModelUnavailableError
from connectors.stores import open_stores
from connectors.stores.base import TaskSubmission
from engine.runtime.request import GenerateRequest, Usage
from pipelines.document.cuad import load_categories, to_key
from pipelines.document.synthetic import make_bad_pdfs, make_contract

OWNER = "key-contracts"


def _chunk_text(request: GenerateRequest) -> str:
    user = [m for m in request.messages if m["role"] == "user"][-1]
    return "".join(p.get("text", "") for p in user["content"] if isinstance(p, dict))


class QuotingModel:
    """Answers each chunk with the gold clauses whose text is in the chunk (cited on their page), plus one made-up
    quote; can fail (model unavailable) on a given call to interrupt a run."""

    def __init__(self, gold: list[Any], fail_on_call: int | None = None) -> None:
        self.gold = gold
        self.calls = 0
        self.fail_on_call = fail_on_call
        self.requests: list[GenerateRequest] = []

    async def generate(self, request: GenerateRequest) -> ModelReply:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise ModelUnavailableError("replica restarting")
        self.requests.append(request)
        text = " ".join(_chunk_text(request).split())
        item = request.json_schema["properties"]["items"]["items"]
        branches = item.get("anyOf", [item])  # a user schema has one branch per field
        allowed = {k for b in branches for k in b["properties"]["category"].get("enum", [])} | {
            b["properties"]["category"]["const"] for b in branches if "const" in b["properties"]["category"]}
        page_bounds = branches[0]["properties"]["page"]
        items = []
        for g in self.gold:
            key = to_key(g.category)
            if key in allowed and g.page and " ".join(g.text.split()) in text:
                items.append({"category": key, "value": "Yes", "quote": g.text, "page": g.page})
        if "governing_law" in allowed:
            items.append({"category": "governing_law", "value": "Mars", "quote": "governed by the laws of Mars",
                          "page": page_bounds["minimum"]})
        reply = json.dumps({"items": items})
        return ModelReply(text=reply, finish_reason="stop", usage=Usage(prompt_tokens=1000, completion_tokens=50))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def contract():
    return make_contract(pages=24, seed=3)


def _input(pdf: bytes, **extra: Any) -> dict[str, Any]:
    return {"file": {"name": "msa.pdf", "data": base64.b64encode(pdf).decode()}, **extra}


async def _run_task(stores, model, input: dict[str, Any], runs: int = 1):
    runner = TaskRunner(stores, build_registry(), model, RunnerOptions(lease_s=30, retry_delay_s=0))
    record, _ = await stores.tasks.submit(OWNER, TaskSubmission(type="contract_extraction", input=input))
    done = None
    for _ in range(runs):
        done = await runner.run_once()
    return record, done


def test_extracts_every_gold_clause_with_verified_citations(tmp_path: Path, contract) -> None:
    async def main() -> None:
        stores = open_stores(f"sqlite:///{tmp_path}")
        model = QuotingModel(contract.gold)
        _, done = await _run_task(stores, model, _input(contract.pdf))
        assert done.status == "succeeded", done.error
        result = done.result
        assert result["schema_kind"] == "cuad" and result["page_count"] == 24
        fields = {f["key"]: f for f in result["fields"]}
        assert len(fields) == 41  # every category reported, found or not
        scanned = set(contract.scanned_pages)
        for g in contract.gold:
            if g.page in scanned:
                continue
            values = fields[to_key(g.category)]["values"]
            cited = [c for v in values for c in v["citations"] if c["verified"]]
            assert any(c["page"] == g.page for c in cited), (g.category, g.page, values)
        # the made-up quote is kept but marked unverified, never as a verified citation
        mars = [v for v in fields["governing_law"]["values"] if v["value"] == "Mars"]
        assert mars and not mars[0]["verified"] and not any(c["verified"] for c in mars[0]["citations"])
        assert fields["governing_law"]["values"][0]["verified"]  # the supported value ranks first
        # every request was constrained and within the window
        assert all(r.json_schema is not None for r in model.requests)
        # artifacts: annotated PDF with a highlight per verified citation, on the right pages
        blob = await stores.blobs.get(OWNER, result["artifacts"]["annotated_pdf"]["ref"])
        pdf = pymupdf.open(stream=blob, filetype="pdf")
        highlighted = {(a.info["subject"], page.number + 1) for page in pdf for a in page.annots()
                       if a.type[1] == "Highlight"}
        names = {c.key: c.name for c in load_categories()}
        for g in contract.gold:
            if g.page not in scanned:
                assert (names[to_key(g.category)], g.page) in highlighted
        assert not any(subject == "Governing Law" and page != next(
            x.page for x in contract.gold if x.category == "Governing Law") for subject, page in highlighted)
        summary = (await stores.blobs.get(OWNER, result["artifacts"]["summary_md"]["ref"])).decode()
        assert "Governing Law" in summary and "unverified" in summary.lower()
        assert result["stats"]["model_calls"] == len(model.requests) >= 1
        # the session remembers the findings for follow-up questions
        memory = await stores.sessions.messages(result["session_id"], OWNER)
        assert memory[0].role == "system" and "Governing Law" in memory[0].content
        await stores.close()

    run(main())


def test_drop_unverified_and_a_user_schema(tmp_path: Path, contract) -> None:
    schema = {"type": "object", "properties": {
        "governing_law": {"type": "string", "description": "Which state's law governs the contract"},
        "audit_rights": {"type": "string", "description": "Audit rights of a party"}}}

    async def main() -> None:
        stores = open_stores(f"sqlite:///{tmp_path}")
        _, done = await _run_task(stores, QuotingModel(contract.gold), _input(contract.pdf, schema=schema,
                                                                              unverified="drop"))
        assert done.status == "succeeded", done.error
        result = done.result
        assert result["schema_kind"] == "user" and set(result["data"]) == {"governing_law", "audit_rights"}
        assert result["unverified_dropped"] >= 1
        values = [v for f in result["fields"] for v in f["values"]]
        assert values and all(v["verified"] for v in values)
        await stores.close()

    run(main())


def test_an_interrupted_run_resumes_from_the_finished_chunks(tmp_path: Path, contract) -> None:
    async def main() -> None:
        stores = open_stores(f"sqlite:///{tmp_path}")
        options = {"categories": ["Governing Law", "audit_rights", "Insurance"], "chunk_tokens": 1500}
        model = QuotingModel(contract.gold, fail_on_call=4)  # the model goes away during chunk 4
        record, first = await _run_task(stores, model, _input(contract.pdf, **options), runs=1)
        assert first.status == "queued" and first.attempts == 1  # handed back for a retry
        calls_before = model.calls
        runner = TaskRunner(stores, build_registry(), model, RunnerOptions(lease_s=30))
        done = await runner.run_once()
        assert done.status == "succeeded", done.error
        planned = [e for e in await stores.tasks.events(record.id) if e.type == "planned"][-1].data["chunks"]
        assert planned >= 6
        # the second run computed only the chunks the first did not finish (chunks 1-3 were reused)
        assert model.calls - calls_before == planned - 3
        progress = [e for e in await stores.tasks.events(record.id) if e.type == "progress"]
        assert sum("(reused)" in e.data["message"] for e in progress) == 3
        await stores.close()

    run(main())


@pytest.mark.parametrize("name", ["encrypted", "corrupt", "empty", "not_pdf"])
def test_bad_documents_fail_clearly(tmp_path: Path, name: str) -> None:
    paths = make_bad_pdfs(tmp_path / "bad")

    async def main() -> None:
        stores = open_stores(f"sqlite:///{tmp_path / 'stores'}")
        _, done = await _run_task(stores, QuotingModel([]), _input(paths[name].read_bytes()))
        assert done.status == "failed" and done.error.code == name, done.error
        assert done.attempts == 1  # not retried: it would fail the same way
        await stores.close()

    run(main())


def test_encrypted_with_password_works(tmp_path: Path) -> None:
    paths = make_bad_pdfs(tmp_path / "bad")

    async def main() -> None:
        stores = open_stores(f"sqlite:///{tmp_path / 'stores'}")
        _, done = await _run_task(stores, QuotingModel([]), _input(paths["encrypted"].read_bytes(),
                                                                  password="secret"))
        assert done.status == "succeeded", done.error
        await stores.close()

    run(main())


def test_a_2000_page_file_is_refused_or_bounded(tmp_path: Path) -> None:
    from pipelines.document.synthetic import make_long_pdf

    pdf = make_long_pdf(2000)

    async def main() -> None:
        stores = open_stores(f"sqlite:///{tmp_path / 'stores'}")
        _, refused = await _run_task(stores, QuotingModel([]), _input(pdf))
        assert refused.status == "failed" and refused.error.code == "too_many_pages"
        assert "500" in refused.error.message
        record, bounded = await _run_task(stores, QuotingModel([]), _input(pdf, max_pages=40, truncate=True,
                                                                           categories=["Governing Law"]))
        assert bounded.status == "succeeded", bounded.error
        assert bounded.result["page_count"] == 40
        events = await stores.tasks.events(record.id)
        assert any(e.type == "reading" for e in events) and any(e.type == "progress" for e in events)
        await stores.close()

    run(main())


def test_submission_checks_the_input(tmp_path: Path) -> None:
    from agents.registry import InvalidTaskInput

    registry = build_registry()
    for bad, where in (({}, "file"), ({"file": {"data": "%%%"}}, "base64"),
                       ({"url": "ftp://x/a.pdf"}, "url"), ({"blob": "abc"}, "blob"),
                       ({"file": {"data": ""}, "categories": ["Parking Rights"]}, "Parking Rights"),
                       ({"file": {"data": ""}, "schema": {"type": "array"}}, "object")):
        with pytest.raises(InvalidTaskInput) as info:
            registry.validate("contract_extraction", bad)
        assert re.search(where, str(info.value), re.I), (bad, str(info.value))
