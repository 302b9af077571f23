"""Bad input across the API: every case is a clean 4xx with a JSON error body (or, for content only an agent
can judge, a failed task with a clear code), nothing is accepted by mistake, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from tests.task_server import task_server

KEY = "sk-battery-0001"
H = {"Authorization": f"Bearer {KEY}"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(size: tuple[int, int] = (8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """A PNG whose header claims 30,000 x 30,000 pixels (900 MP) but that compresses to a few KB."""
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, format="PNG")
    return buf.getvalue()


def chat(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "kimi-vl", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def image_part(url: str) -> list[dict[str, Any]]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    from engine.runtime.engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)
    with task_server(f"sqlite:///{tmp_path_factory.mktemp('battery')}", KEY, engine=engine) as url:
        yield url


BOMB = bomb_png()
# (name, method, path, kwargs, expected status)
HTTP_CASES: list[tuple[str, str, str, dict[str, Any], int]] = [
    ("no key", "POST", "/v1/tasks", {"json": {"type": "chat"}, "headers": {}}, 401),
    ("wrong key", "GET", "/v1/tasks", {"headers": {"Authorization": "Bearer sk-nope-nope"}}, 401),
    ("malformed auth header", "GET", "/v1/tasks", {"headers": {"Authorization": "Basic abc"}}, 401),
    ("bad JSON", "POST", "/v1/tasks", {"content": b"{nope", "headers": {"content-type": "application/json"}}, 422),
    ("JSON array body", "POST", "/v1/tasks", {"json": [1, 2]}, 422),
    ("wrong content type", "POST", "/v1/tasks", {"content": b"type=chat",
                                                 "headers": {"content-type": "application/x-www-form-urlencoded"}},
     422),
    ("unknown task type", "POST", "/v1/tasks", {"json": {"type": "nope"}}, 422),
    ("task type with path chars", "POST", "/v1/tasks", {"json": {"type": "../../etc/passwd"}}, 422),
    ("extra field", "POST", "/v1/tasks", {"json": {"type": "chat", "inputs": {}}}, 422),
    ("idempotency key too long", "POST", "/v1/tasks", {"json": {"type": "chat", "idempotency_key": "k" * 500}},
     422),
    ("chat task without messages", "POST", "/v1/tasks", {"json": {"type": "chat", "input": {}}}, 422),
    ("chat task with a bad role", "POST", "/v1/tasks",
     {"json": {"type": "chat", "input": {"messages": [{"role": "root", "content": "x"}]}}}, 422),
    ("contract: no source", "POST", "/v1/tasks", {"json": {"type": "contract_extraction", "input": {}}}, 422),
    ("contract: two sources", "POST", "/v1/tasks", {"json": {"type": "contract_extraction", "input": {
        "url": "https://example.com/a.pdf", "blob": "0" * 64}}}, 422),
    ("contract: file path instead of data", "POST", "/v1/tasks", {"json": {"type": "contract_extraction", "input": {
        "file": {"name": "../../etc/passwd", "path": "/etc/passwd"}}}}, 422),
    ("contract: not base64", "POST", "/v1/tasks", {"json": {"type": "contract_extraction", "input": {
        "file": {"data": "%%%"}}}}, 422),
    ("contract: file:// URL", "POST", "/v1/tasks", {"json": {"type": "contract_extraction", "input": {
        "url": "file:///etc/passwd"}}}, 422),
    ("contract: schema not an object", "POST", "/v1/tasks", {"json": {"type": "contract_extraction", "input": {
        "file": {"data": ""}, "schema": {"type": "string"}}}}, 422),
    ("contract: unknown category", "POST", "/v1/tasks", {"json": {"type": "contract_extraction", "input": {
        "file": {"data": ""}, "categories": ["Moon Rights"]}}}, 422),
    ("contract: max_pages 0", "POST", "/v1/tasks", {"json": {"type": "contract_extraction", "input": {
        "file": {"data": ""}, "max_pages": 0}}}, 422),
    ("video: question without question", "POST", "/v1/tasks", {"json": {"type": "video_analysis", "input": {
        "file": {"data": ""}, "kind": "question"}}}, 422),
    ("video: blob ref not a hash", "POST", "/v1/tasks", {"json": {"type": "video_analysis", "input": {
        "blob": "../../../secret"}}}, 422),
    ("video: schema without events", "POST", "/v1/tasks", {"json": {"type": "video_analysis", "input": {
        "file": {"data": ""}, "schema": {"type": "object", "properties": {"a": {}}}}}}, 422),
    ("unknown task option", "POST", "/v1/tasks", {"json": {"type": "chat", "input": {"messages": [
        {"role": "user", "content": "hi"}]}, "options": {"max_tokens": 2}}}, 422),
    ("chat task: malformed data URL", "POST", "/v1/tasks", {"json": {"type": "chat", "input": {"messages": [
        {"role": "user", "content": image_part("data:image/png;base64,…")}]}}}, 422),
    ("customer_service: the README's placeholder data URL", "POST", "/v1/tasks", {"json": {
        "type": "customer_service", "input": {"message": "hi", "images": ["data:image/png;base64,…"]}}}, 422),
    ("contract: a PNG named .pdf", "POST", "/v1/tasks", {"json": {"type": "contract_extraction", "input": {
        "file": {"name": "c.pdf", "data": b64(png())}}}}, 422),
    ("contract: blob never uploaded", "POST", "/v1/tasks", {"json": {"type": "contract_extraction", "input": {
        "blob": "0" * 64}}}, 422),
    ("video: a PDF given as the video", "POST", "/v1/tasks", {"json": {"type": "video_analysis", "input": {
        "file": {"data": b64(b"%PDF-1.7 not a video")}}}}, 422),
    ("os_agent: unknown desktop", "POST", "/v1/tasks", {"json": {"type": "os_agent", "input": {
        "goal": "x", "desktop": "no-such-desktop"}}}, 422),
    ("unknown session in options", "POST", "/v1/tasks", {"json": {"type": "chat", "input": {"messages": [
        {"role": "user", "content": "hi"}]}, "options": {"session_id": "sess_missing"}}}, 404),
    ("missing task", "GET", "/v1/tasks/task_missing", {}, 404),
    ("path traversal task id", "GET", "/v1/tasks/..%2F..%2Fetc%2Fpasswd", {}, 404),
    ("missing task events", "GET", "/v1/tasks/task_missing/events", {}, 404),
    ("negative after", "GET", "/v1/tasks/task_missing/events?after=-1", {}, 422),
    ("list: bad status", "GET", "/v1/tasks?status=sleeping", {}, 422),
    ("list: limit 0", "GET", "/v1/tasks?limit=0", {}, 422),
    ("list: limit huge", "GET", "/v1/tasks?limit=100000", {}, 422),
    ("missing artifact", "GET", "/v1/tasks/task_missing/artifacts/annotated_pdf", {}, 404),
    ("empty upload", "POST", "/v1/files", {"content": b""}, 400),
    ("session: bad ttl", "POST", "/v1/sessions", {"json": {"ttl_s": -5}}, 422),
    ("missing session", "GET", "/v1/sessions/sess_missing/messages", {}, 404),
    ("chat: empty messages", "POST", "/v1/chat/completions", {"json": {"model": "kimi-vl", "messages": []}}, 422),
    ("chat: n=2", "POST", "/v1/chat/completions", {"json": chat("hi", n=2)}, 422),
    ("chat: max_tokens huge", "POST", "/v1/chat/completions", {"json": chat("hi", max_tokens=10**9)}, 422),
    ("chat: temperature out of range", "POST", "/v1/chat/completions", {"json": chat("hi", temperature=9)}, 422),
    ("chat: unknown session", "POST", "/v1/chat/completions", {"json": chat("hi", session_id="sess_missing")}, 404),
    ("chat: malformed data URL", "POST", "/v1/chat/completions",
     {"json": chat(image_part("data:image/png;base64,@@@"))}, 400),
    ("chat: not an image", "POST", "/v1/chat/completions",
     {"json": chat(image_part("data:image/png;base64," + b64(b"%PDF-1.7 not an image")))}, 415),
    ("chat: decompression bomb", "POST", "/v1/chat/completions",
     {"json": chat(image_part("data:image/png;base64," + b64(BOMB)))}, 413),
    ("chat: loopback URL (SSRF)", "POST", "/v1/chat/completions",
     {"json": chat(image_part("http://127.0.0.1:6379/x.png"))}, 400),
    ("chat: metadata URL (SSRF)", "POST", "/v1/chat/completions",
     {"json": chat(image_part("http://169.254.169.254/latest/meta-data"))}, 400),
    ("chat: private URL (SSRF)", "POST", "/v1/chat/completions",
     {"json": chat(image_part("http://10.0.0.1/x.png"))}, 400),
    ("chat: file URL", "POST", "/v1/chat/completions", {"json": chat(image_part("file:///etc/passwd"))}, 400),
    ("chat: schema not JSON schema", "POST", "/v1/chat/completions",
     {"json": chat("hi", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": 5}})}, 422),
]


@pytest.mark.parametrize("name, method, path, kwargs, status", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_request_is_a_clean_4xx(server: str, name: str, method: str, path: str, kwargs: dict[str, Any],
                                    status: int) -> None:
    kwargs = dict(kwargs)
    given = kwargs.pop("headers", None)
    headers = {} if given == {} else {**H, **(given or {})}  # {} = no Authorization header at all
    response = httpx.request(method, f"{server}{path}", headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, (name, response.status_code, response.text[:300])
    body = response.json()
    assert body["error"]["message"] and body["error"]["code"], body
    assert KEY not in response.text  # secrets never echoed


AGENT_CASES = [
    ("encrypted PDF", "contract_extraction", "encrypted"),
    ("corrupt PDF", "contract_extraction", "corrupt"),
    ("zero-page PDF", "contract_extraction", "empty"),
    ("corrupt video", "video_analysis", "corrupt"),
    ("audio-only video", "video_analysis", "no_video_stream"),
    ("8K video", "video_analysis", "resolution_too_large"),
    ("10-hour video", "video_analysis", "too_long"),
]


def test_bad_files_fail_their_tasks_clearly(server: str, tmp_path: Path) -> None:
    from pipelines.document.synthetic import make_bad_pdfs
    from pipelines.video.synthetic import make_bad_videos

    pdfs = make_bad_pdfs(tmp_path / "pdf")
    videos = make_bad_videos(tmp_path / "video")
    files = {"encrypted": pdfs["encrypted"], "corrupt_pdf": pdfs["corrupt"], "empty_pdf": pdfs["empty"], "corrupt_video": videos["corrupt"],
             "no_video_stream": videos["no_video_stream"], "resolution_too_large": videos["resolution_too_large"],
             "too_long": videos["too_long"]}
    ids = {}
    for (name, type_, code), path in zip(AGENT_CASES, files.values()):
        response = httpx.post(f"{server}/v1/tasks", headers=H, json={
            "type": type_, "input": {"file": {"name": path.name, "data": b64(path.read_bytes())}}})
        assert response.status_code == 202, (name, response.text)
        ids[name] = (response.json()["id"], code)
    deadline = time.monotonic() + 120
    for name, (task_id, code) in ids.items():
        while True:
            task = httpx.get(f"{server}/v1/tasks/{task_id}", headers=H).json()
            if task["status"] in ("succeeded", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, (name, task)
            time.sleep(0.1)
        assert task["status"] == "failed" and task["error"]["code"] == code, (name, task)
        assert task["attempts"] == 1, (name, task)


def test_uploaded_blobs_are_checked_at_submission(server: str, tmp_path: Path) -> None:
    """An Excel file uploaded and given as a contract is a 422 naming input.blob, before anything is queued (a
    Word .docx is accepted: tests/test_office_documents.py)."""
    import zipfile

    docx = tmp_path / "contract.xlsx"
    with zipfile.ZipFile(docx, "w") as z:
        z.writestr("xl/workbook.xml", "<workbook/>")
    ref = httpx.post(f"{server}/v1/files", headers=H, content=docx.read_bytes()).json()
    blob = ref.get("ref") or ref.get("id")
    before = httpx.get(f"{server}/v1/tasks?limit=500", headers=H).json()["data"]
    r = httpx.post(f"{server}/v1/tasks", headers=H, json={"type": "contract_extraction", "input": {"blob": blob}})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["param"] == "input.blob" and "Word" in error["message"] and error["code"] == "invalid_input"
    assert len(httpx.get(f"{server}/v1/tasks?limit=500", headers=H).json()["data"]) == len(before)
    pdf = httpx.post(f"{server}/v1/files", headers=H, content=b"%PDF-1.4 tiny").json()
    ok = httpx.post(f"{server}/v1/tasks", headers=H, json={"type": "contract_extraction", "input": {
        "blob": pdf.get("ref") or pdf.get("id")}})
    assert ok.status_code == 202, ok.text  # a PDF header passes; whether it opens is the agent's job


@pytest.mark.parametrize("options, expected", [
    (["kind=summary"], "kind"),                       # a typo of a value
    (["kind=question"], "needs a question"),          # a value that needs another field
    (["colour=red"], "colour"),                       # an unknown key
])
def test_cli_options_are_validated_input(server: str, options: list[str], expected: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``kimiray submit --option k=v`` feeds the agent's validated input: a bad one exits 2 with the reason."""
    from kimiray import task_cli

    argv = ["submit", "video_analysis", "https://example.com/v.mp4", "--url", server, "--api-key", KEY]
    for option in options:
        argv += ["--option", option]
    assert task_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def test_server_still_serves_after_the_battery(server: str) -> None:
    ok = httpx.post(f"{server}/v1/chat/completions", headers=H, json=chat("still there?"), timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
    assert httpx.get(f"{server}/healthz").status_code == 200
