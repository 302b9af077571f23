"""A real CUAD contract (an SEC filing of 60 pages) end to end on the Ray Serve application: ``POST /v1/files`` +
``POST /v1/tasks`` with the tiny checkpoint, the TaskRunner replica killed (SIGKILL) in the middle of the document and
restarted by Serve; the task succeeds once, reuses the chunks finished before the kill, and every citation that says
``verified: true`` is found on its page(s) of the PDF.

The tiny model's 4K window needs ~1 chunk per page: the whole file is about 90 s on a 2-core machine.
``KIMIRAY_REAL_CONTRACT_PAGES=N`` reads only the first N pages (``max_pages`` + ``truncate``) for a quicker run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from pipelines.document.reader import read_pdf
from tests.serve_harness import running_service

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cuad"
CONTRACT = DATA / "SigaTechnologiesInc_20190603_8-K_EX-10.1_11695818_EX-10.1_Promotion Agreement.pdf"
KEY = "sk-contract-real-01"
H = {"Authorization": f"Bearer {KEY}"}
PAGES = int(os.environ.get("KIMIRAY_REAL_CONTRACT_PAGES", "60"))
pytestmark = pytest.mark.timeout(1500)
OPTIONS = {"categories": ["Parties", "Governing Law", "Insurance"], "max_items_per_chunk": 1, "max_value_chars": 24,
           "max_quote_chars": 60, "max_output_tokens": 120, "max_pages": PAGES, "truncate": True,
           "overlap_tokens": 64}


def _runner_pid() -> int | None:
    import ray

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "#TaskRunner" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            try:
                return ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
            except Exception:  # noqa: BLE001 - a replica going away
                return None
    return None


def _wait(what: str, check, timeout: float, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


@pytest.mark.skipif(not CONTRACT.exists(), reason=f"no CUAD contract at {CONTRACT}")
def test_a_real_contract_through_serve_with_a_runner_restart(tmp_path: Path) -> None:
    args = {"request_timeout_s": 120, "tasks": {"lease_s": 3.0, "runner_concurrency": 1, "max_attempts": 3,
                                                "stores_url": f"sqlite:///{tmp_path / 'stores'}"}}
    pdf = CONTRACT.read_bytes()
    with running_service(tmp_path / "home", KEY, args, with_runner=True) as url, \
            httpx.Client(base_url=url, headers=H, timeout=120) as http:
        ref = http.post("/v1/files", content=pdf, headers={"Content-Type": "application/pdf"})
        assert ref.status_code == 201, ref.text
        blob = ref.json()["ref"]
        created = http.post("/v1/tasks", json={"type": "contract_extraction", "input": {"blob": blob, **OPTIONS}})
        assert created.status_code in (200, 201, 202), created.text
        task_id = created.json()["id"]

        def progressed():
            task = http.get(f"/v1/tasks/{task_id}").json()
            assert task["status"] in ("queued", "running"), task
            return (task.get("progress") or {}).get("done", 0) >= 3 and task

        _wait("3 chunks done", progressed, 300)
        victim = _runner_pid()
        assert victim is not None
        os.kill(victim, signal.SIGKILL)  # no graceful hand-back: the lease expires, a new replica takes the task
        done = _wait("the task to end", lambda: (t := http.get(f"/v1/tasks/{task_id}").json())["status"] in
                     ("succeeded", "failed", "cancelled") and t, 1200, interval=0.5)
        assert done["status"] == "succeeded", done.get("error")
        assert done["attempts"] == 2  # the killed run and the one that finished
        assert _runner_pid() not in (None, victim)
        events = http.get(f"/v1/tasks/{task_id}/events")  # the task has ended: the stream replays all and closes
        result = done["result"]

    # nothing lost, nothing done twice: one result, both runs planned the same chunks, the finished ones reused
    parsed = [json.loads(line[5:]) for line in events.text.splitlines() if line.startswith("data:")]
    planned = [e["data"]["chunks"] for e in parsed if e.get("type") == "planned"]
    reused = [e for e in parsed if e.get("type") == "progress" and "(reused)" in e["data"].get("message", "")]
    assert len(planned) == 2 and planned[0] == planned[1] >= 6  # killed well before the end; same plan both runs
    assert len(reused) >= 2
    assert result["page_count"] == PAGES and {f["name"] for f in result["fields"]} == set(OPTIONS["categories"])
    document = read_pdf(pdf, max_pages=PAGES, truncate=True)
    verified = [c for f in result["fields"] for v in f["values"] for c in v["citations"] if c["verified"]]
    for c in verified:  # a verified citation is really there, on every page it names
        for part in c["parts"] or [c]:
            page = document.pages[part["page"] - 1]
            assert page.text[part["char_start"]:part["char_end"]] == part["quote"]
    for f in result["fields"]:
        for v in f["values"]:
            assert 0.0 <= v["confidence"] <= 1.0
            assert v["verified"] == any(c["verified"] for c in v["citations"])
