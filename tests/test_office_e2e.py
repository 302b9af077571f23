"""A Word contract and an e-mail thread through the real task path (HTTP ingress, TaskRunner, the tiny checkpoint
in the real engine): accepted at submission, rendered, planned, extracted under the JSON schema, annotated."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pymupdf
import pytest
import torch

from pipelines.document.synthetic import make_contract
from tests.office_samples import make_docx, make_thread_eml
from tests.task_server import task_server, wait_for_status

pytestmark = pytest.mark.integration
KEY = "sk-office-e2e-01"
H = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    from engine.runtime.engine import AsyncEngine

    return AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)


def test_docx_and_eml_contracts_with_the_tiny_checkpoint(tmp_path: Path, engine, tiny_checkpoint: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIMIRAY_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tiny-kimi-vl").symlink_to(tiny_checkpoint)  # the runner's tokenizer = the engine's
    options = {"categories": ["Governing Law"], "max_items_per_chunk": 1, "max_value_chars": 24,
               "max_quote_chars": 60, "max_output_tokens": 60}
    files = {"msa.docx": make_docx(), "thread.eml": make_thread_eml(make_contract(pages=2, seed=4).pdf)}
    with task_server(f"sqlite:///{tmp_path / 'stores'}", KEY, engine=engine) as url:
        ids = {}
        for name, data in files.items():
            r = httpx.post(f"{url}/v1/tasks", headers=H, json={"type": "contract_extraction", "input": {
                "file": {"name": name, "data": base64.b64encode(data).decode()}, **options}})
            assert r.status_code == 202, r.text
            ids[name] = r.json()["id"]
        for name, task_id in ids.items():
            done = wait_for_status(url, KEY, task_id, ("succeeded", "failed"), timeout=300)
            assert done["status"] == "succeeded", (name, done)
            result = done["result"]
            assert result["format"] == name.rsplit(".", 1)[1] and result["page_count"] >= 1
            assert [f["key"] for f in result["fields"]] == ["governing_law"]
            for value in result["fields"][0]["values"]:  # whatever the random model said, citations are checked
                for c in value["citations"]:
                    assert not c["verified"] or c["anchor"], c  # a verified quote names its paragraph
            pdf = httpx.get(f"{url}/v1/tasks/{task_id}/artifacts/annotated_pdf", headers=H)
            assert pdf.status_code == 200 and pymupdf.open(stream=pdf.content, filetype="pdf").page_count >= 1
