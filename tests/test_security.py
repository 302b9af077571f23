"""Security of the HTTP surface, against the real ingress app (tests/task_server.py, tiny engine):

* every route in the app's route table but the public ones needs a key - enumerated, so a new route can't be
  forgotten;
* one key can't see, change or use another key's tasks, events, artifacts, sessions, messages, children or
  uploaded files (everything answers 404, as for a missing id);
* secrets (API keys, the Redis password in the stores URL) appear in no log line, stdout/stderr, error body or
  task record, across auth failures, bad input, a failed task and a Redis outage;
* per-key limits: the key over its rate or concurrency limit gets 429, another key is unaffected.

Public on purpose: ``/healthz`` and ``/readyz`` (probes of load balancers and orchestrators carry no key) and the
API description (``/openapi.json``, ``/docs``, ``/docs/oauth2-redirect``, ``/redoc``: no data, and clients need
the spec before they have a key). ``serve_app.ingress.PUBLIC_ROUTES`` is that list.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from starlette.routing import Route

from serve_app.ingress import PUBLIC_ROUTES, create_app
from tests.task_server import task_server, wait_for_status

KEY_A, KEY_B = "sk-sec-alpha-7f3c2a91", "sk-sec-bravo-5d8e0b47"
INTENDED_PUBLIC = {"/healthz", "/readyz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
CONSOLE_ROUTES = {"/ui", "/ui/{name:path}"}  # the web console's static files (no data; its API calls need a key)
REPO = Path(__file__).resolve().parents[1]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Any:
    from engine.runtime.engine import AsyncEngine

    return AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, engine: Any):
    stores = tmp_path_factory.mktemp("security")
    with task_server(f"sqlite:///{stores}", f"{KEY_A},{KEY_B}", engine=engine, lease_s=3.0,
                     app_args={"limits": {"max_tokens_cap": 64}}) as url:
        yield url


# ----------------------------------------------------------------------------------------- keys on every route


def _flatten(routes: list[Any], prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route, descending into included routers (FastAPI keeps those lazily)."""
    pairs = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            pairs += _flatten(included.routes, prefix + route.include_context.prefix)
            continue
        assert isinstance(route, Route), f"unexpected route kind {route!r}: teach this test about it"
        pairs += [(method, prefix + route.path) for method in sorted(route.methods or ()) if method != "HEAD"]
    return pairs


def _route_table() -> list[tuple[str, str]]:
    """Every route the app serves, docs included; HEAD rides along with GET."""
    return _flatten(create_app().routes)


ROUTES = _route_table()
PROTECTED = [(m, p) for m, p in ROUTES if p not in PUBLIC_ROUTES and p not in CONSOLE_ROUTES]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", path)


def test_the_public_routes_are_exactly_the_intended_ones(server: str) -> None:
    assert PUBLIC_ROUTES == INTENDED_PUBLIC
    assert INTENDED_PUBLIC <= {p for _, p in ROUTES}
    assert {p for _, p in ROUTES if p.startswith("/ui")} == CONSOLE_ROUTES
    documented = {(m.upper(), p) for p, ops in create_app().openapi()["paths"].items() for m in ops}
    assert documented <= set(ROUTES)  # the table really was read, included routers too
    assert {(m, p) for m, p in documented if p not in INTENDED_PUBLIC} <= set(PROTECTED)
    for path in INTENDED_PUBLIC:
        assert httpx.get(f"{server}{path}", timeout=30).status_code in (200, 503), path


@pytest.mark.parametrize("headers", [
    {}, auth("sk-not-a-key-e41b"), {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": f"Bearer {KEY_A} x"},
    {"Authorization": "Bearer"}, {"X-Api-Key": KEY_A},
], ids=["no key", "wrong key", "basic auth", "key plus junk", "empty bearer", "key in another header"])
def test_every_route_but_the_public_ones_needs_a_key(server: str, headers: dict[str, str]) -> None:
    for method, path in PROTECTED:
        r = httpx.request(method, f"{server}{_concrete(path)}", headers=headers, timeout=30, json={})
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer", (method, path)  # RFC 6750: the scheme to use
        assert r.headers["content-type"].startswith("application/json"), (method, path)
        assert r.json()["error"]["type"] == "authentication_error", (method, path)
        for value in headers.values():  # the presented credential is never echoed
            assert not [part for part in value.split() if part not in ("Bearer", "Basic") and part in r.text]


def test_unknown_paths_and_path_tricks_need_a_key_too(server: str) -> None:
    for path in ("/v1/nope", "/healthz/", "/HEALTHZ", "/v1/tasks/", "//v1/tasks", "/healthz/../v1/tasks",
                 "/v1/tasks?x=/healthz", "/openapi.json/../v1/tasks"):
        r = httpx.get(f"{server}{path}", timeout=30)
        assert r.status_code == 401, (path, r.status_code)


# ------------------------------------------------------------------------------------------- cross-key isolation


def _submit(url: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/tasks", json=body, headers=auth(key), timeout=30)
    assert r.status_code in (200, 202), r.text
    return r.json()


def _all_events(url: str, key: str, task_id: str) -> str:
    with httpx.stream("GET", f"{url}/v1/tasks/{task_id}/events", headers=auth(key), timeout=60) as r:
        assert r.status_code == 200
        return "".join(r.iter_text())


def test_one_key_cannot_reach_another_keys_objects(server: str) -> None:
    # key A's objects: a session with messages, a task with an artifact, a task whose session has children,
    # a running task, an uploaded file
    session = httpx.post(f"{server}/v1/sessions", json={"metadata": {"who": "a"}}, headers=auth(KEY_A)).json()
    sid = session["id"]
    chat = httpx.post(f"{server}/v1/chat/completions", headers=auth(KEY_A), timeout=60, json={
        "model": "kimi-vl", "session_id": sid, "max_tokens": 2,
        "messages": [{"role": "user", "content": "secret plans of A"}]})
    assert chat.status_code == 200, chat.text
    report = _submit(server, KEY_A, {"type": "report", "input": {"text": "A's report"}, "idempotency_key": "same"})
    chunked = _submit(server, KEY_A, {"type": "chunked_count", "input": {"words": 400, "chunk_tokens": 100}})
    running = _submit(server, KEY_A, {"type": "sleepy", "input": {"steps": 600, "step_s": 0.05}})
    upload = httpx.post(f"{server}/v1/files", content=b"%PDF-1.4 A's contract", headers=auth(KEY_A))
    assert upload.status_code == 201
    blob = upload.json()["ref"]
    wait_for_status(server, KEY_A, report["id"], ("succeeded",))
    done = wait_for_status(server, KEY_A, chunked["id"], ("succeeded",))
    wait_for_status(server, KEY_A, running["id"], ("running",))
    children = httpx.get(f"{server}/v1/sessions/{done['session_id']}/children", headers=auth(KEY_A)).json()
    assert children["data"], "the chunked task should have child sessions"
    artifact = httpx.get(f"{server}/v1/tasks/{report['id']}/artifacts/report", headers=auth(KEY_A))
    assert artifact.status_code == 200 and artifact.content == b"A's report"

    has_confirm = any(p == "/v1/tasks/{task_id}/confirm" for _, p in ROUTES)
    probes = [
        ("GET", f"/v1/tasks/{report['id']}", None),
        ("GET", f"/v1/tasks/{report['id']}/events", None),
        ("GET", f"/v1/tasks/{report['id']}/artifacts/report", None),
        ("POST", f"/v1/tasks/{running['id']}/cancel", None),
        ("GET", f"/v1/sessions/{sid}", None),
        ("GET", f"/v1/sessions/{sid}/messages", None),
        ("GET", f"/v1/sessions/{done['session_id']}/children", None),
        ("GET", f"/v1/sessions/{report['session_id']}", None),  # a task's own session
        ("DELETE", f"/v1/sessions/{sid}", None),
        ("POST", "/v1/tasks", {"type": "chat", "options": {"session_id": sid},
                               "input": {"messages": [{"role": "user", "content": "hi"}]}}),
        ("POST", "/v1/chat/completions", {"model": "kimi-vl", "session_id": sid, "max_tokens": 2,
                                          "messages": [{"role": "user", "content": "what did A say?"}]}),
    ]
    if has_confirm:
        probes.append(("POST", f"/v1/tasks/{running['id']}/confirm", {"step": 0, "approve": True}))
    for method, path, body in probes:
        r = httpx.request(method, f"{server}{path}", json=body, headers=auth(KEY_B), timeout=60)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "not_found"
        assert "secret plans" not in r.text and "A's report" not in r.text

    # nothing of A's is listed for B, and B's idempotency key does not meet A's
    listed = httpx.get(f"{server}/v1/tasks?limit=500", headers=auth(KEY_B)).json()["data"]
    assert not {t["id"] for t in listed} & {report["id"], chunked["id"], running["id"]}
    mine = _submit(server, KEY_B, {"type": "report", "input": {"text": "B"}, "idempotency_key": "same"})
    assert mine["id"] != report["id"] and mine["created"] is True

    # A's file used by B as a task input: refused at submission exactly like a blob that does not exist
    def refusal(ref: str) -> dict:
        r = httpx.post(f"{server}/v1/tasks", json={"type": "contract_extraction", "input": {"blob": ref}},
                       headers=auth(KEY_B), timeout=30)
        assert r.status_code == 422, r.text
        return r.json()["error"]

    stolen, missing = refusal(blob), refusal("f" * 64)
    assert stolen["param"] == missing["param"] == "input.blob"
    assert stolen["message"].replace(blob, "X") == missing["message"].replace("f" * 64, "X")

    # and A's objects are untouched by B's attempts
    assert httpx.get(f"{server}/v1/sessions/{sid}", headers=auth(KEY_A)).status_code == 200
    messages = httpx.get(f"{server}/v1/sessions/{sid}/messages", headers=auth(KEY_A)).json()["data"]
    assert len(messages) == 2 and "secret plans of A" in str(messages[0])
    still = httpx.get(f"{server}/v1/tasks/{running['id']}", headers=auth(KEY_A)).json()
    assert still["status"] == "running" and not still["cancel_requested"]
    httpx.post(f"{server}/v1/tasks/{running['id']}/cancel", headers=auth(KEY_A))
    assert "A's report" not in _all_events(server, KEY_B, mine["id"])


# --------------------------------------------------------------------------------------------------- secrets


REDIS_PASSWORD = "rp-9c41e07b-never-log-me"
SECRET_KEY = "sk-sec-charlie-3b7d91e5f0"
WRONG_KEY = "sk-sec-wrong-66aa41c2d8"


def _assert_clean(where: str, text: str) -> None:
    for secret in (REDIS_PASSWORD, SECRET_KEY, WRONG_KEY):
        assert secret not in text, f"a secret leaked into {where}: ...{text[max(0, text.find(secret) - 200):][:400]}"


def test_secrets_never_appear_in_logs_errors_or_records(tmp_path: Path, engine: Any, caplog: pytest.LogCaptureFixture,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    from tests.redis_harness import redis_server

    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG)
    bodies: list[str] = []

    def call(method: str, url: str, **kwargs: Any) -> httpx.Response:
        r = httpx.request(method, url, timeout=120, **kwargs)
        bodies.append(f"{r.status_code} {dict(r.headers)} {r.text}")
        return r

    try:
        with redis_server(tmp_path / "redis", password=REDIS_PASSWORD) as redis:
            assert REDIS_PASSWORD in redis.url
            with task_server(redis.url, SECRET_KEY, engine=engine, lease_s=2.0,
                             app_args={"limits": {"max_tokens_cap": 16}}) as url:
                h = auth(SECRET_KEY)
                # auth failures, with the real key misplaced and a wrong key
                call("GET", f"{url}/v1/tasks", headers=auth(WRONG_KEY))
                call("GET", f"{url}/v1/tasks", headers={"Authorization": f"Basic {SECRET_KEY}"})
                call("GET", f"{url}/v1/tasks", headers={"Authorization": f"Bearer {SECRET_KEY}{WRONG_KEY}"})
                auth_failures = bodies[:]
                # bad input (the client's own input may be echoed back to it; server secrets may not)
                call("POST", f"{url}/v1/tasks", headers=h, json={"type": "no-such-type", "input": {}})
                call("POST", f"{url}/v1/tasks", headers={**h, "content-type": "application/json"}, content=b"{nope")
                call("POST", f"{url}/v1/chat/completions", headers=h, json={
                    "model": "kimi-vl", "max_tokens": 2, "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]}]})
                call("GET", f"{url}/v1/tasks", headers=h, params={"cursor": "not-a-cursor"})
                # a task that fails, one that succeeds
                failing = call("POST", f"{url}/v1/tasks", headers=h,
                               json={"type": "sleepy", "input": {"steps": 1, "fail_with": "boom"}}).json()
                ok = call("POST", f"{url}/v1/tasks", headers=h, json={"type": "chat", "input": {
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}).json()
                wait_for_status(url, SECRET_KEY, failing["id"], ("failed",))
                wait_for_status(url, SECRET_KEY, ok["id"], ("succeeded",))
                # Redis goes away: requests answer 503 and the runner logs its retries; then it comes back
                redis.stop(kill=True)
                down = call("GET", f"{url}/v1/tasks", headers=h)
                assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable", down.text
                assert down.headers.get("retry-after")
                redis.start()
                back = call("GET", f"{url}/v1/tasks", headers=h)
                assert back.status_code == 200
                for task in back.json()["data"]:
                    bodies.append(str(task))
                    bodies.append(_all_events(url, SECRET_KEY, task["id"]))
            _assert_worker_banner_is_clean(redis.url)
    finally:
        root.setLevel(old_level)
    out, err = capfd.readouterr()
    assert "store error" in caplog.text or "lease failed" in caplog.text  # the outage was logged...
    _assert_clean("the logs", caplog.text)  # ...without the secrets
    _assert_clean("stdout/stderr", out + err)
    for body in bodies:
        _assert_clean("a response or task record", body)
    assert len(auth_failures) == 3 and all(b.startswith("401 ") for b in auth_failures)


def _assert_worker_banner_is_clean(stores_url: str) -> None:
    """``kimiray worker`` (agents.worker) prints which store it uses: with the password masked."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agents.worker", "--stores", stores_url, "--agent-module", "tests.agents_for_tests",
         "--model", "none", "--concurrency", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        banner = ""
        while "store " not in banner and time.monotonic() < deadline and proc.poll() is None:
            banner += proc.stdout.readline()
        assert "store redis://***@127.0.0.1" in banner, banner
        _assert_clean("the worker's banner", banner)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rest, _ = proc.communicate()
    _assert_clean("the worker's output", rest or "")


# ------------------------------------------------------------------------------------------------ per-key limits


def _chat(url: str, key: str, **extra: Any) -> httpx.Response:
    body = {"model": "kimi-vl", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=auth(key), timeout=120)


def test_a_key_over_its_limits_gets_429_and_other_keys_do_not(tmp_path: Path, engine: Any) -> None:
    """Rate: 12 per minute (burst 2). Concurrency: 1 at a time, held by a request whose image URL answers only when
    the test says so. test_serve_limits covers the 429 through Ray."""
    keys = ["sk-lim-rate-a", "sk-lim-rate-b", "sk-lim-conc-a", "sk-lim-conc-b"]
    app_args = {"auth": {"requests_per_minute": 12, "max_concurrent_per_key": 1},
                "limits": {"allow_private_urls": True}}
    with task_server(f"sqlite:///{tmp_path}", ",".join(keys), engine=engine, app_args=app_args) as url:
        codes = [_chat(url, "sk-lim-rate-a").status_code for _ in range(3)]
        assert codes[-1] == 429 and codes.count(200) >= 1, codes
        assert _chat(url, "sk-lim-rate-b").status_code == 200  # another key is not slowed down
        limited = _chat(url, "sk-lim-rate-a")
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limited"

        with held_image() as (image_url, fetched, release):
            holder: dict[str, httpx.Response] = {}
            slow = threading.Thread(target=lambda: holder.update(r=_chat(url, "sk-lim-conc-a", messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}]}])))
            slow.start()
            assert fetched.wait(60), "the held request never fetched its image"
            second = _chat(url, "sk-lim-conc-a")  # the key's one slot is taken
            other = _chat(url, "sk-lim-conc-b")
            release.set()
            slow.join(60)
        assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limited"
        assert other.status_code == 200 and holder["r"].status_code == 200, holder["r"].text
        assert _chat(url, "sk-lim-conc-a").status_code == 200  # the slot came back


def test_creations_have_their_own_per_key_budget(tmp_path: Path, engine: Any) -> None:
    """Task submissions, uploads and session creations share a per-key budget (burst 1 at 6 per minute here): past
    it, 429 with Retry-After and nothing stored; other keys and reads are unaffected."""
    keys = ["sk-create-a", "sk-create-b"]
    with task_server(f"sqlite:///{tmp_path}", ",".join(keys), engine=engine,
                     app_args={"auth": {"creates_per_minute": 6}}) as url:
        a, b = auth("sk-create-a"), auth("sk-create-b")
        task = {"type": "chat", "input": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
        first = httpx.post(f"{url}/v1/tasks", json=task, headers=a, timeout=30)
        assert first.status_code == 202, first.text
        for method, path, kwargs in (("POST", "/v1/tasks", {"json": task}), ("POST", "/v1/sessions", {"json": {}}),
                                     ("POST", "/v1/files", {"content": b"%PDF-1.4 tiny"})):
            refused = httpx.request(method, f"{url}{path}", headers=a, timeout=30, **kwargs)
            assert refused.status_code == 429, (path, refused.text)
            assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
        listed = httpx.get(f"{url}/v1/tasks", headers=a, timeout=30).json()["data"]
        assert [t["id"] for t in listed] == [first.json()["id"]]  # the refused submissions stored nothing
        assert httpx.post(f"{url}/v1/sessions", json={}, headers=b, timeout=30).status_code == 201
        assert httpx.get(f"{url}/v1/tasks/{first.json()['id']}", headers=a, timeout=30).status_code == 200


@contextmanager
def held_image() -> Iterator[tuple[str, threading.Event, threading.Event]]:
    """A loopback HTTP server with one PNG that it sends only after ``release`` is set; ``fetched`` is set when a
    request for it arrives."""
    import io
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    png = buf.getvalue()
    fetched, release = threading.Event(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            fetched.set()
            release.wait(60)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/held.png", fetched, release
    finally:
        release.set()
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------------------------- metric labels


class RouteRecorder:
    def __init__(self) -> None:
        self.routes: list[str] = []

    def request(self, route: str, status: int, key_id: str, latency_s: float) -> None:
        self.routes.append(route)


def test_metrics_label_requests_by_route_template_not_by_raw_path(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A label per task id, or per path a scanner makes up, would grow the metric series - and memory - forever."""
    from fastapi.testclient import TestClient

    from serve_app.config import AppConfig
    from serve_app.ingress import install_state

    monkeypatch.setenv("KIMIRAY_API_KEYS", f"{KEY_A},{KEY_B}")
    app = create_app()
    config = AppConfig.model_validate({"tasks": {"stores_url": f"sqlite:///{tmp_path}"}})
    state = install_state(app, config, None)  # type: ignore[arg-type]
    state.metrics = RouteRecorder()  # type: ignore[assignment]
    with TestClient(app) as client:
        for i in range(5):
            client.get(f"/v1/tasks/task_{i}", headers=auth(KEY_A))
            client.get(f"/scan/{i}/.env")
            client.get(f"/v1/sessions/sess_{i}/messages", headers=auth(KEY_B))
        client.get("/healthz")
    assert set(state.metrics.routes) == {"/v1/tasks/{task_id}", "unmatched", "/v1/sessions/{session_id}/messages",
                                         "/healthz"}
    try:
        asyncio.run(state.tasks().close())
    except Exception:  # noqa: BLE001 - best effort
        pass
