"""The web console at /ui in a real Chromium (Debian's, driven by Playwright) against the real service: the
ingress app over HTTP, a TaskRunner, the tiny checkpoint in the real engine, an Xvfb desktop. One service and one
browser for every scenario; screenshots of each screen go to ``test-artifacts/console/``.

The tiny random-weight model drives the contract extraction submitted through the form, the chat stream and the
cancel path. Two scenarios need a reply random weights cannot give, so requests that carry ``SCRIPTED`` in their
text get a scripted model instead (the agent code, stores, REST API and browser are the same): a contract reply
whose value is an XSS payload quoting a document that contains one, and an OS agent that clicks the one button
whose click needs an operator's approval."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pymupdf
import pytest
import torch

from connectors.model_client import BackendModelClient, ModelReply
from engine.runtime.request import GenerateRequest, Usage
from tests.task_server import task_server, wait_for_status

CHROMIUM = "/usr/bin/chromium"
try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    sync_playwright = None  # type: ignore[assignment]

pytestmark = [
    pytest.mark.e2e,  # a browser on the whole path: ingress over HTTP, runner, agents, engine, Xvfb desktop
    pytest.mark.skipif(sync_playwright is None or not Path(CHROMIUM).exists() or shutil.which("Xvfb") is None,
                       reason="needs playwright, Debian's chromium and Xvfb (scripts/test.sh installs them)"),
]

KEY, OTHER = "sk-console-test-0001", "sk-console-test-0002"
SCRIPTED = "[console-scripted]"
XSS_VALUE = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
XSS_SENTENCE = "This Agreement is governed by the laws of <script>window.__xss=3</script> Delaware."
XSS_NAME = '<img src=x onerror="window.__xss=4">.pdf'
ARTIFACTS = Path(os.environ.get("KIMIRAY_TEST_ARTIFACTS", "test-artifacts")) / "console"
SCREEN = (800, 600)
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


def _texts(request: GenerateRequest) -> str:
    parts = []
    for message in request.messages or []:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "\n".join(parts)


class RoutedModel:
    """The real tiny engine, except for requests whose text carries ``SCRIPTED`` (see the module docstring)."""

    def __init__(self, real: Any, os_model: Any) -> None:
        self.real, self.os_model = real, os_model

    async def generate(self, request: GenerateRequest) -> ModelReply:
        text = _texts(request)
        if SCRIPTED not in text:
            return await self.real.generate(request)
        properties = (request.json_schema or {}).get("properties", {})
        if "items" in properties:  # a contract chunk
            reply: dict[str, Any] = {"items": [
                {"category": "governing_law", "value": XSS_VALUE, "quote": XSS_SENTENCE, "page": 1}]}
        elif "observations" in properties:  # a video window: the red scene starts at 00:10
            reply = {"observations": [{"start": "00:10", "end": "00:14", "relevant": True,
                                       "description": "a red car <img src=x onerror=window.__xss=8>"}]}
        elif "answer" in properties:  # the video's answer over the timeline
            reply = {"answer": "The red car appears at 00:10.", "citations": [{"time": "00:10",
                                                                               "claim": "red car"}]}
        else:
            return await self.os_model.generate(request)
        return ModelReply(text=json.dumps(reply), finish_reason="stop",
                          usage=Usage(prompt_tokens=100, completion_tokens=20))


def _pdf(lines: list[str]) -> bytes:
    doc = pymupdf.open()
    page = doc.new_page(width=612, height=792)
    y = 90
    for line in lines:
        page.insert_text((72, y), line, fontsize=11)
        y += 22
    return doc.tobytes()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    from agents.os_agent.harness.launch import launch_app, stop_app
    from connectors.desktop.xvfb import VirtualDisplay
    from engine.runtime.engine import AsyncEngine
    from connectors.backend import LocalBackend
    from tests.os_agent_helpers import ScreenReadingModel

    tmp = tmp_path_factory.mktemp("console")
    (tmp / "home").mkdir()
    (tmp / "home" / "tiny-kimi-vl").symlink_to(tiny_checkpoint)  # the runner's tokenizer = the engine's
    engine = AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)
    with pytest.MonkeyPatch.context() as mp, VirtualDisplay(*SCREEN) as display:
        mp.setenv("KIMIRAY_HOME", str(tmp / "home"))
        mp.setenv("KIMIRAY_DESKTOPS", json.dumps({"lab": {"kind": "x11", "display": display.display}}))
        state = tmp / "app.json"
        app = launch_app(display.env(), state)
        model = RoutedModel(BackendModelClient(LocalBackend(engine)), ScreenReadingModel(state, SCREEN))
        try:
            with task_server(f"sqlite:///{tmp / 'stores'}", f"{KEY},{OTHER}", engine=engine, model_client=model,
                             tasks_args={"runner_concurrency": 3}) as url:
                yield {"url": url, "state": state}
        finally:
            stop_app(app)


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, service):
    """A fresh tab (own sessionStorage) at 1280x800; fails the test on any page error or CSP violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
    tab.on("console", lambda msg: problems.append(f"console: {msg.text}")
           if msg.type == "error" and "Content Security Policy" in msg.text else None)
    tab.set_default_timeout(30_000)
    yield tab
    context.close()
    assert not problems, problems


def _shot(page: Page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def _sign_in(page: Page, url: str, key: str = KEY) -> None:
    page.goto(f"{url}/ui/")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Tasks")).to_be_visible()


def _api(url: str, key: str = KEY) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_console_is_static_with_a_strict_csp_and_the_new_routes_are_bounded(service) -> None:
    url = service["url"]
    with httpx.Client(base_url=url, timeout=30) as anon:
        index = anon.get("/ui/")
        assert index.status_code == 200 and "text/html" in index.headers["content-type"]
        csp = index.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert "<script" in index.text and not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", index.text)  # no inline
        assert anon.get("/ui").status_code == 308
        assert anon.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
        for bad in ("/ui/..%2Fingress.py", "/ui/%2e%2e/console_ui.py", "/ui/.hidden.js", "/ui/nope.js"):
            assert anon.get(bad).status_code == 404, bad
        assert anon.get("/v1/task-types").status_code == 401  # the console's pages are public, the API is not
    host, port = url.removeprefix("http://").split(":")
    for raw in ("/ui/../v1/tasks", "/ui/%2e%2e/v1/tasks", "/ui/..%2fv1%2ftasks"):  # no normalising client
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", raw)
        reply = conn.getresponse()
        assert reply.status == 404 and b'"object": "list"' not in reply.read(), raw  # never the API without a key
        conn.close()
    pdf = _pdf(["Page image test.", "Second line."])
    with _api(url) as own, _api(url, OTHER) as other:
        ref = own.post("/v1/files", content=pdf, headers={"Content-Type": "application/pdf"}).json()["ref"]
        task = own.post("/v1/tasks", json={"type": "sleepy", "input": {"steps": 1, "step_s": 0}}).json()
        got = own.get(f"/v1/files/{ref}")
        assert got.status_code == 200 and got.content == pdf and got.headers["content-type"] == "application/pdf"
        assert "sandbox" in got.headers["content-security-policy"]
        assert other.get(f"/v1/files/{ref}").status_code == 404  # another key's file is missing, not forbidden
        missing = own.get("/v1/files/not-a-ref")  # neither a blob ref nor an OpenAI file id: no such file
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "file_id"
        contract = own.post("/v1/tasks", json={"type": "contract_extraction", "input": {
            "blob": ref, "categories": ["Governing Law"], "max_output_tokens": 16}}).json()
        image = own.get(f"/v1/tasks/{contract['id']}/pages/1", params={"width": 300})
        assert image.status_code == 200 and image.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert image.headers["x-page-width"] == "612.00" and image.headers["x-page-count"] == "1"
        assert pymupdf.Pixmap(image.content).width == 300
        assert own.get(f"/v1/tasks/{contract['id']}/pages/2").status_code == 404
        assert own.get(f"/v1/tasks/{contract['id']}/pages/1", params={"width": 5000}).status_code == 422
        assert other.get(f"/v1/tasks/{contract['id']}/pages/1").status_code == 404
        assert own.get(f"/v1/tasks/{task['id']}/pages/1").status_code == 404  # no PDF behind a sleepy task
        wait_for_status(url, KEY, contract["id"], ("succeeded", "failed"), timeout=120)


def test_sign_in_wrong_key_then_right_key_then_sign_out(page: Page, service) -> None:
    url = service["url"]
    page.goto(f"{url}/ui/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("API key").fill("sk-wrong-key-000000")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("401")
    expect(page.get_by_role("alert")).to_contain_text("a valid API key is required")
    assert page.evaluate("sessionStorage.length") == 0
    _shot(page, "01-sign-in-error")
    _sign_in(page, url)
    assert KEY not in page.url
    assert page.evaluate("sessionStorage.getItem('kimiray.apiKey')") == KEY
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('kimiray.apiKey')") is None


def _wait_status(page: Page, status: str, timeout_ms: int = 180_000) -> None:
    expect(page.locator("#task-status")).to_have_text(status, timeout=timeout_ms)


def test_submit_form_shows_field_errors_then_a_contract_runs_and_is_reviewed(page: Page, service) -> None:
    from pipelines.document.synthetic import make_contract

    url = service["url"]
    _sign_in(page, url)
    page.get_by_role("link", name="New task").click()
    expect(page.get_by_label("Task type")).to_have_value("contract_extraction")
    categories = page.get_by_label("Categories")
    categories.fill("Not A Category")
    page.get_by_role("button", name="Submit").click()  # 422 from the server, shown at the field it names
    error = page.locator("#err-categories")
    expect(error).to_contain_text("422")
    expect(categories).to_have_attribute("aria-invalid", "true")
    _shot(page, "02-submit-field-error")
    categories.fill("Governing Law\nInsurance")
    page.get_by_label("File").set_input_files({"name": "msa.pdf", "mimeType": "application/pdf",
                                               "buffer": make_contract(pages=2, seed=1).pdf})
    page.get_by_text("More options").click()
    page.get_by_label("Max Output Tokens").fill("48")
    page.get_by_label("Max Items Per Chunk").fill("2")
    page.get_by_role("button", name="Submit").click()
    expect(page.locator("h1 code")).to_be_visible()
    task_id = page.locator("h1 code").inner_text()
    _wait_status(page, "succeeded")
    expect(page.locator("#events li").first).to_contain_text("#1")
    ids = [int(t.strip("#")) for t in page.locator("#events .event-id").all_inner_texts()]
    assert ids == list(range(1, len(ids) + 1))  # every event once, in order
    # the review: server-rendered pages beside every requested field
    expect(page.locator("#fields h3")).to_have_text(["Governing Law", "Insurance"])
    first_page = page.locator("#page-1 img")
    expect(first_page).to_have_attribute("src", re.compile("^blob:"))
    page.wait_for_function("() => document.querySelector('#page-1 img').naturalWidth > 0")
    values = page.locator(".value-text")
    if values.count():  # random weights may find nothing; when they do, the value selects and scrolls
        values.first.click()
        expect(page.locator(".value.selected")).to_have_count(1)
    _shot(page, "03-contract-review-tiny-model")
    record = _api(url).get(f"/v1/tasks/{task_id}").json()
    assert record["status"] == "succeeded" and record["input"]["categories"] == ["Governing Law", "Insurance"]
    assert record["input"]["max_output_tokens"] == 48 and len(record["input"]["blob"]) == 64


def _scripted_contract(url: str) -> dict[str, Any]:
    """A finished contract task whose document and (scripted) model reply carry XSS payloads, cited on page 1."""
    pdf = _pdf([f"Master Services Agreement {SCRIPTED}", "", XSS_SENTENCE, "",
                '<img src=x onerror="window.__xss=5"> is how the other party signs.'])
    with _api(url) as own:
        task = own.post("/v1/tasks", json={"type": "contract_extraction", "input": {
            "file": {"name": XSS_NAME, "data": base64.b64encode(pdf).decode()},
            "categories": ["Governing Law"]}}).json()
    return wait_for_status(url, KEY, task["id"], ("succeeded",), timeout=120)


def test_review_draws_citation_boxes_and_nothing_untrusted_executes(page: Page, service) -> None:
    url = service["url"]
    task = _scripted_contract(url)
    _sign_in(page, url)
    page.goto(f"{url}/ui/#/tasks/{task['id']}")
    _wait_status(page, "succeeded")
    value = page.locator(".value-text").first
    expect(value).to_have_text(XSS_VALUE)  # the payload is shown as text
    expect(page.locator(".value .badge-verified")).to_have_count(1)
    expect(page.locator("[data-artifact='annotated_pdf']")).to_contain_text("<img src=x")
    value.click()
    box = page.locator("#page-1 .cite-box.active")
    expect(box).to_have_count(1)
    expect(box).to_be_in_viewport()
    page.wait_for_function("() => document.querySelector('#page-1 img').naturalWidth > 0")
    # the box sits on the quoted line: inside the page, in its upper half, wider than tall
    frame, rect = page.locator("#page-1 .page-box").bounding_box(), box.bounding_box()
    assert frame and rect and frame["x"] <= rect["x"] and rect["x"] + rect["width"] <= frame["x"] + frame["width"]
    assert frame["y"] < rect["y"] < frame["y"] + frame["height"] / 2 and rect["width"] > 3 * rect["height"]
    _shot(page, "04-contract-review-citation")
    # the follow-up chat on the task's session streams a reply from the tiny model
    page.get_by_label("Ask about this contract").fill("Which law governs? <script>window.__xss=6</script>")
    page.get_by_role("button", name="Ask").click()
    expect(page.locator("#followup-log .msg.user")).to_have_text("Which law governs? <script>window.__xss=6</script>")
    page.wait_for_function("() => document.querySelector('#followup-log .msg.assistant').textContent.length > 0")
    with page.expect_download() as download:
        page.get_by_role("button", name="Markdown").click()
    assert download.value.suggested_filename.endswith(".summary.md")
    assert page.evaluate("window.__xss") is None
    assert page.locator("img[src='x'], script:not([src])").count() == 0


def test_tasks_list_filters_live_progress_and_cancel(page: Page, service) -> None:
    url = service["url"]
    with _api(url) as own:
        slow = own.post("/v1/tasks", json={"type": "sleepy", "input": {"steps": 400, "step_s": 0.1,
                                                                      "tag": "<b>slow</b>"}}).json()
        for i in range(3):
            own.post("/v1/tasks", json={"type": "sleepy", "input": {"steps": 1, "step_s": 0, "tag": str(i)}})
    _sign_in(page, url)
    row = page.locator(f"tr[data-task-id='{slow['id']}']")
    expect(row.locator(".status")).to_have_text("running")
    page.wait_for_function(f"() => document.querySelector(\"tr[data-task-id='{slow['id']}'] progress\").value >= 3")
    page.get_by_label("Type").select_option("sleepy")
    page.get_by_label("Status").select_option("running")
    expect(page.locator("tbody tr")).to_have_count(1)
    _shot(page, "05-tasks-list")
    page.get_by_role("link", name=slow["id"]).click()
    expect(page.locator("#stream-state")).to_have_text("● live")
    page.wait_for_function("() => document.querySelectorAll('#events li').length >= 6")
    _shot(page, "06-task-running")
    page.get_by_role("button", name="Cancel").click()
    _wait_status(page, "cancelled", 30_000)
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    page.get_by_role("link", name="← Tasks").click()
    page.get_by_label("Status").select_option("cancelled")
    expect(page.locator(f"tr[data-task-id='{slow['id']}'] .status")).to_have_text("cancelled")


def test_event_stream_resumes_after_a_dropped_connection_without_gaps_or_repeats(page: Page, service) -> None:
    url = service["url"]
    _sign_in(page, url)
    page.goto(f"{url}/ui/#/chat")  # off the task list, whose live rows would open streams of their own
    expect(page.get_by_role("heading", name="Tasks")).to_have_count(0)
    with _api(url) as own:
        task = own.post("/v1/tasks", json={"type": "sleepy", "input": {"steps": 30, "step_s": 0.1}}).json()
    resumed: list[str | None] = []

    def cut_first_stream(route) -> None:
        """The first events connection delivers 5 events, then drops; later ones pass through."""
        resumed.append(route.request.headers.get("last-event-id"))
        if len(resumed) > 1:
            route.continue_()
            return
        response = route.fetch()
        events = [e for e in response.text().split("\n\n") if e.startswith("id:")]
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"},
                      body="".join(e + "\n\n" for e in events[:5]))

    page.route(re.compile(rf".*/v1/tasks/{task['id']}/events$"), cut_first_stream)  # this task's streams only
    page.goto(f"{url}/ui/#/tasks/{task['id']}")
    expect(page.locator("#events li").last).to_contain_text("status succeeded", timeout=60_000)
    ids = [int(t.strip("#")) for t in page.locator("#events .event-id").all_inner_texts()]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 60  # none missed, none repeated
    assert resumed[:2] == [None, "5"]  # the reconnect asked only for the events after the fifth


def test_os_agent_steps_stream_and_a_risky_click_is_approved_in_the_browser(page: Page, service) -> None:
    from agents.os_agent.harness.launch import read_state

    url = service["url"]
    with _api(url) as own:
        task = own.post("/v1/tasks", json={"type": "os_agent", "input": {
            "goal": f"{SCRIPTED} Click the Dangerous button.", "desktop": "lab", "max_steps": 4,
            "policy": {"confirm": ["click"]}, "confirm_timeout_s": 120, "settle_s": 0.1,
            "screenshot_max_side": 640}}).json()
    _sign_in(page, url)
    page.goto(f"{url}/ui/#/tasks/{task['id']}")
    approve = page.get_by_role("button", name="Approve")
    expect(approve).to_be_visible(timeout=60_000)
    expect(page.locator("#confirmations code")).to_contain_text("click")
    assert read_state(service["state"]).get("dangerous_clicked") in (None, False)  # nothing ran before approval
    _shot(page, "07-os-agent-confirmation")
    approve.click()
    _wait_status(page, "succeeded", 120_000)
    expect(page.locator("#confirmations")).to_contain_text("approved")
    expect(page.locator("#outcome")).to_contain_text("done")
    first = page.locator(".step[data-index='0']")
    expect(first.locator(".badge")).to_have_text("executed")
    expect(first.locator("img")).to_have_attribute("src", re.compile("^blob:"))
    expect(first.locator("svg circle.click")).to_have_count(1)
    page.wait_for_function("() => document.querySelector(\".step[data-index='0'] img\").naturalWidth > 0")
    # the ring is drawn where the click went: over the button's box on the screenshot
    widget = read_state(service["state"])["widgets"]["dangerous"]
    shot, ring = first.locator("img").bounding_box(), first.locator("svg circle.click").bounding_box()
    assert shot and ring
    cx = (ring["x"] + ring["width"] / 2 - shot["x"]) / shot["width"] * SCREEN[0]
    cy = (ring["y"] + ring["height"] / 2 - shot["y"]) / shot["height"] * SCREEN[1]
    assert widget[0] - 2 <= cx <= widget[2] + 2 and widget[1] - 2 <= cy <= widget[3] + 2
    assert read_state(service["state"])["dangerous_clicked"]
    first.scroll_into_view_if_needed()
    _shot(page, "08-os-agent-steps")


def test_chat_playground_streams_with_an_image_and_json_schema_mode(page: Page, service) -> None:
    from PIL import Image
    import io

    url = service["url"]
    _sign_in(page, url)
    page.get_by_role("link", name="Chat").click()
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 40)).save(buffer, "PNG")
    page.get_by_label("Message (Ctrl+Enter sends)").fill("What colour is this? <img src=x onerror=window.__xss=7>")
    page.get_by_label("Image").set_input_files({"name": "red.png", "mimeType": "image/png",
                                                "buffer": buffer.getvalue()})
    page.get_by_text("Settings").click()
    page.get_by_label("Max tokens").fill("12")
    page.get_by_role("button", name="Send").click()
    first = page.locator("#chat-log .msg.assistant").first
    expect(first).to_have_attribute("data-finish", re.compile("stop|length"), timeout=60_000)
    expect(page.locator("#chat-log .msg.user p")).to_have_text("What colour is this? <img src=x onerror=window.__xss=7>")
    expect(page.locator("#chat-log .msg.user img.thumb")).to_have_count(1)
    # JSON-schema mode: the second turn is constrained to the schema, and carries the first turn along
    page.get_by_label("JSON-schema mode").check()
    page.get_by_label("Max tokens").fill("48")
    page.get_by_label("JSON schema").fill('{"type": "object", "properties": {"ok": {"type": "boolean"}}, '
                                          '"required": ["ok"], "additionalProperties": false}')
    page.get_by_label("Message (Ctrl+Enter sends)").fill("Answer in JSON.")
    page.get_by_label("Message (Ctrl+Enter sends)").press("Control+Enter")
    second = page.locator("#chat-log .msg.assistant").nth(1)
    expect(second).to_have_attribute("data-finish", "stop", timeout=60_000)
    assert isinstance(json.loads(second.locator(".answer").inner_text())["ok"], bool)
    assert page.evaluate("window.__xss") is None
    _shot(page, "09-chat")


def test_video_timeline_and_answer_citations_seek_the_uploaded_video(page: Page, service) -> None:
    from pipelines.video.synthetic import make_video

    url = service["url"]
    clip = make_video(None, seconds=20, fps=5, size=(320, 240),
                      scenes=[(0.0, "intro", (20, 40, 220)), (10.0, "red car", (220, 30, 30))])
    with _api(url) as own:
        ref = own.post("/v1/files", content=clip.data, headers={"Content-Type": "video/mp4"}).json()["ref"]
        task = own.post("/v1/tasks", json={"type": "video_analysis", "input": {
            "blob": ref, "kind": "question", "question": f"{SCRIPTED} When does the red car appear?",
            "max_frames": 8, "max_side": 160}}).json()
    wait_for_status(url, KEY, task["id"], ("succeeded",), timeout=120)
    _sign_in(page, url)
    page.goto(f"{url}/ui/#/tasks/{task['id']}")
    expect(page.locator("#answer")).to_have_text("The red car appears at 00:10.")
    expect(page.locator("#timeline li")).to_contain_text(["a red car <img src=x onerror=window.__xss=8>"])
    expect(page.locator("#contact-sheet")).to_have_attribute("src", re.compile("^blob:"))
    page.wait_for_function("() => document.querySelector('#player').readyState >= 1", timeout=30_000)
    page.wait_for_function("() => document.querySelector('#contact-sheet').naturalWidth > 0")
    page.get_by_role("button", name="00:10", exact=True).click()
    page.wait_for_function("() => Math.abs(document.querySelector('#player').currentTime - 10) < 0.5")
    # the contact sheet's frame nearest 00:10 is outlined (its time is in the artifact's frame list)
    cells = _api(url).get(f"/v1/tasks/{task['id']}").json()["result"]["artifacts"]["contact_sheet"]["frames"]
    nearest = min(cells, key=lambda c: abs(c["t"] - 10))
    expect(page.locator("#frame-marker")).to_be_visible()
    assert float(page.locator("#frame-marker").get_attribute("data-t")) == nearest["t"]
    assert page.evaluate("window.__xss") is None
    _shot(page, "10-video")
    page.locator("#frame-marker").scroll_into_view_if_needed()
    _shot(page, "10b-video-contact-sheet")


def test_citation_shapes_keyboard_and_a_narrow_window(page: Page, service) -> None:
    """Both citation shapes (one page with boxes; a page range with one part per page) are read; the review
    works from the keyboard; a narrow window stacks pages over fields."""
    url = service["url"]
    _sign_in(page, url)
    shapes = page.evaluate("""async () => {
        const m = await import('/ui/contract.js');
        const one = {page: 2, bboxes: [[10, 20, 30, 40]], quote: 'q', verified: true};
        const range = {page: 3, page_end: 5, quote: 'q', verified: true, confidence: 0.8,
                       bboxes: [{page: 3, bbox: [1, 2, 3, 4]}, {page: 5, bboxes: [[5, 6, 7, 8]]}, [4, 9, 9, 9, 9]]};
        const list = {pages: [7, 8], quote: 'q', verified: false};
        const parts = {page: 9, page_end: 10, bboxes: [[1, 1, 2, 2]], quote: 'a b', verified: true, parts: [
            {page: 9, char_start: 0, char_end: 1, bboxes: [[1, 1, 2, 2]], quote: 'a'},
            {page: 10, char_start: 0, char_end: 1, bboxes: [[3, 3, 4, 4], [5, 5, 6, 6]], quote: 'b'}]};
        return [m.citationPages(one), m.citationBoxes(one), m.citationPages(range), m.citationBoxes(range),
                m.citationPages(list), m.citationBoxes(list), m.citationPages(parts), m.citationBoxes(parts)];
    }""")
    assert shapes == [[2], [{"page": 2, "box": [10, 20, 30, 40]}], [3, 4, 5],
                      [{"page": 3, "box": [1, 2, 3, 4]}, {"page": 5, "box": [5, 6, 7, 8]}, {"page": 4, "box": [9, 9, 9, 9]}],
                      [7, 8], [], [9, 10],
                      [{"page": 9, "box": [1, 1, 2, 2]}, {"page": 10, "box": [3, 3, 4, 4]},
                       {"page": 10, "box": [5, 5, 6, 6]}]]
    task = _scripted_contract(url)

    def with_confidence_and_a_second_part(route) -> None:
        """The task as i15's results will carry it: a confidence, and a citation in parts (one per page)."""
        body = route.fetch().json()
        value = body["result"]["fields"][0]["values"][0]
        first = value["citations"][0]
        value["confidence"] = 0.87
        part = {"page": 1, "char_start": 0, "char_end": 6, "quote": "Master", "bboxes": [[72, 78, 160, 92]]}
        value["citations"].append({**first, "page_end": 1, "bboxes": part["bboxes"], "parts": [part]})
        route.fulfill(json=body)

    page.route(re.compile(rf".*/v1/tasks/{task['id']}$"), with_confidence_and_a_second_part)
    page.goto(f"{url}/ui/#/tasks/{task['id']}")
    expect(page.locator(".value .badge-confidence")).to_have_text("confidence 87%")
    value = page.locator(".value-text").first
    value.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#page-1 .cite-box.active")).to_have_count(2)  # the line, and the second citation's part
    page.set_viewport_size({"width": 420, "height": 800})
    pages, fields = page.locator("#pages").bounding_box(), page.locator("#fields").bounding_box()
    assert pages and fields and fields["y"] >= pages["y"] + pages["height"] - 1  # stacked, not side by side
    assert page.evaluate("document.documentElement.scrollWidth") <= 420  # no sideways scrolling
    _shot(page, "11-contract-review-narrow")


def test_chat_shows_a_thinking_models_reasoning_apart_from_the_answer(page: Page, service) -> None:
    """The tiny checkpoint is not a Thinking model, so this one reply is the OpenAI-style stream a Thinking model
    sends (``reasoning_content`` deltas, then ``content``), served in place of the real one: the display is what
    is under test."""
    url = service["url"]
    chunks = [{"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {"reasoning_content": "The image is red, "}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {"reasoning_content": "<b>so</b> answer red."}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {"content": "Red."}, "finish_reason": None}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    page.route(re.compile(r".*/v1/chat/completions$"), lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    _sign_in(page, url)
    page.get_by_role("link", name="Chat").click()
    page.get_by_label("Message (Ctrl+Enter sends)").fill("What colour?")
    page.get_by_role("button", name="Send").click()
    bubble = page.locator("#chat-log .msg.assistant")
    expect(bubble).to_have_attribute("data-finish", "stop")
    expect(bubble.locator(".answer")).to_have_text("Red.")
    expect(bubble.locator(".reasoning")).to_be_visible()
    expect(bubble.locator(".reasoning-text")).to_have_text("The image is red, <b>so</b> answer red.")


def test_tasks_list_pages_through_only_this_keys_tasks(page: Page, service) -> None:
    url = service["url"]
    with _api(url, OTHER) as other:
        ids = [other.post("/v1/tasks", json={"type": "sleepy", "input": {"steps": 1, "step_s": 0, "tag": str(i)}})
               .json()["id"] for i in range(23)]
    _sign_in(page, url, OTHER)
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(20)
    first_page = rows.evaluate_all("rows => rows.map(r => r.dataset.taskId)")
    page.get_by_role("button", name="Older →").click()
    expect(rows).to_have_count(3)
    expect(page.get_by_role("button", name="Older →")).to_be_disabled()
    second_page = rows.evaluate_all("rows => rows.map(r => r.dataset.taskId)")
    assert sorted(first_page + second_page) == sorted(ids)  # every task once, none of the other key's
    page.get_by_role("button", name="← Newer").click()
    expect(rows).to_have_count(20)


def test_os_agent_denied_click_does_not_run(page: Page, service) -> None:
    from agents.os_agent.harness.launch import read_state

    url = service["url"]
    with _api(url) as own:
        task = own.post("/v1/tasks", json={"type": "os_agent", "input": {
            "goal": f"{SCRIPTED} Tick the I agree box.", "desktop": "lab", "max_steps": 1,
            "policy": {"confirm": ["click"]}, "confirm_timeout_s": 120, "settle_s": 0.1}}).json()
    _sign_in(page, url)
    page.goto(f"{url}/ui/#/tasks/{task['id']}")
    deny = page.get_by_role("button", name="Deny")
    expect(deny).to_be_visible(timeout=60_000)
    page.keyboard.press("Tab")  # focus starts on Approve: the decision can be made from the keyboard
    expect(deny).to_be_focused()
    page.keyboard.press("Enter")
    _wait_status(page, "succeeded", 120_000)
    expect(page.locator("#confirmations")).to_contain_text("denied")
    expect(page.locator(".step[data-index='0'] .badge")).not_to_have_text("executed")
    expect(page.locator("#outcome")).to_contain_text("max_steps")
    assert not read_state(service["state"]).get("agree")


def test_os_agent_question_is_answered_in_the_browser(page: Page, service) -> None:
    """The model's ``call_user`` shows as a question card; the typed answer goes to ``POST /v1/tasks/{id}/reply``
    and into the agent's record (and its next prompt)."""
    url = service["url"]
    with _api(url) as own:
        task = own.post("/v1/tasks", json={"type": "os_agent", "input": {
            "goal": f"{SCRIPTED} Fill in the Name field (ask me which name) and press Submit.", "desktop": "lab",
            "max_steps": 1, "reply_timeout_s": 120, "settle_s": 0.1, "recording": False}}).json()
    _sign_in(page, url)
    page.goto(f"{url}/ui/#/tasks/{task['id']}")
    answer = page.get_by_role("textbox", name="Answer to step 1")
    expect(answer).to_be_visible(timeout=60_000)
    expect(page.locator("#confirmations")).to_contain_text("Which name should I enter?")
    expect(answer).to_be_focused()
    answer.fill("Grace <b>Hopper</b>")
    page.get_by_role("button", name="Send answer").click()
    _wait_status(page, "succeeded", 120_000)
    expect(page.locator("#confirmations")).to_contain_text("you answered Grace <b>Hopper</b>")  # text, not HTML
    with _api(url) as own:
        done = own.get(f"/v1/tasks/{task['id']}").json()
    step = done["result"]["trajectory"][0]
    assert step["status"] == "asked" and step["user_reply"] == "Grace <b>Hopper</b>"
