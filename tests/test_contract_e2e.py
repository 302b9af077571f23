"""End to end on the real stack without Ray: the ingress app over HTTP, a TaskRunner, the tiny checkpoint in the
real engine, the SDK - a generated 60-page contract (scanned page, table, two columns), interrupted half-way by
a runner shutdown and resumed by a new runner on the same store."""

from __future__ import annotations

import time
from pathlib import Path

import pymupdf
import pytest
import torch

import kimiray
from pipelines.document.reader import read_pdf
from pipelines.document.report import ContractResult
from pipelines.document.synthetic import make_contract
from tests.task_server import task_server

KEY = "sk-contract-e2e-01"
CATEGORIES = ["Governing Law", "Insurance", "Audit Rights", "Cap on Liability"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    from engine.runtime.engine import AsyncEngine

    return AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)


def test_sixty_page_contract_end_to_end_with_resume(tmp_path: Path, engine, tiny_checkpoint: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIMIRAY_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tiny-kimi-vl").symlink_to(tiny_checkpoint)  # the runner's tokenizer = the engine's
    contract = make_contract(pages=60, seed=0)
    stores = f"sqlite:///{tmp_path / 'stores'}"
    options = {"categories": CATEGORIES, "max_items_per_chunk": 1, "max_value_chars": 24, "max_quote_chars": 60,
               "max_output_tokens": 120}

    with task_server(stores, KEY, engine=engine) as url, kimiray.Client(url, api_key=KEY) as client:
        ref = client.upload_file(contract.pdf)
        task = client.submit("contract_extraction", {"blob": ref, **options})
        deadline = time.monotonic() + 300
        while True:  # let the runner finish some chunks, then shut it down mid-document
            current = client.get(task.id)
            if current.progress is not None and current.progress.done >= 8:
                break
            assert current.status in ("queued", "running") and time.monotonic() < deadline, current
            time.sleep(0.2)
    # the runner handed the task back when it stopped; a new server + runner on the same store resumes it
    with task_server(stores, KEY, engine=engine) as url, kimiray.Client(url, api_key=KEY) as client:
        done = client.wait(task.id, timeout=600)
        assert done.status == "succeeded" and done.attempts == 1  # a graceful hand-back is not an attempt
        events = list(client.stream_events(task.id))
        planned = [e.data["chunks"] for e in events if e.type == "planned"]
        reused = [e for e in events if e.type == "progress" and "(reused)" in e.data["message"]]
        assert len(planned) == 2 and planned[0] == planned[1] >= 40  # same plan both times
        assert len(reused) >= 7  # chunks finished before the shutdown were not computed again

        # the result matches its schema; every target is reported
        result = ContractResult.model_validate(done.result)
        assert result.page_count == 60 and {f.name for f in result.fields} == set(CATEGORIES)
        # a citation is verified only if its quote is really on that page of the PDF
        document = read_pdf(contract.pdf, ocr=True)  # the agent OCRs the scanned page
        verified = [c for f in result.fields for v in f.values for c in v.citations if c.verified]
        for c in verified:  # on every page it names (a clause across a page break has one part per page)
            for part in c.segments():
                assert document.pages[part.page - 1].text[part.char_start:part.char_end] == part.quote
        assert all(v.verified == any(c.verified for c in v.citations) for f in result.fields for v in f.values)
        # the annotated PDF: same pages, one highlight per verified citation
        out = tmp_path / "annotated.pdf"
        client.download_artifact(task.id, "annotated_pdf", out)
        annotated = pymupdf.open(out)
        assert annotated.page_count == 60
        highlights = sum(1 for page in annotated for a in page.annots() if a.type[1] == "Highlight")
        assert highlights >= len(verified)
        summary = client.download_artifact(task.id, "summary_md").decode()
        assert all(name in summary for name in CATEGORIES)
        stats = done.result["stats"]
        assert 0 < stats["context_fill_max"] <= 1.0 and stats["model_calls"] <= planned[0]

        # follow-up questions continue the task's session: the findings are in the prompt, pages are not re-read
        reply = client.chat("Which law governs this contract?", session_id=done.session_id, max_tokens=4)
        assert reply.usage["prompt_tokens"] > 100
        assert [m.role for m in client.session_messages(done.session_id)][:1] == ["system"]
