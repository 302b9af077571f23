"""The SDK client, its errors and the task CLI against an in-memory fake of the REST contract.

The fake (``FakeServer``) speaks the task API as the server documents it: Task JSON, per-task event logs with
ids 1, 2, 3..., SSE with ``Last-Event-ID`` resume, OpenAI error bodies, Retry-After, idempotency keys, chat
completions (plain and streamed) and sessions. Tasks advance when someone watches their event stream (or,
when asked, on each GET), so ``wait`` sees them queued first. Sleeps are injected: nothing here waits.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import httpx
import pytest

from kimiray import task_cli
from kimiray.client import AsyncClient, Client, SSEDecoder, build_messages, image_url
from kimiray.errors import (
    AuthenticationError,
    ConnectionError,
    InvalidRequestError,
    KimirayError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
    TaskCancelledError,
    TaskFailedError,
    WaitTimeoutError,
    error_for,
)
from kimiray.progress import ProgressPrinter, render_bar, render_event
from kimiray.types import Progress, Task, TaskEvent

KEY = "sk-test"
OTHER_KEY = "sk-other"
BASE = "http://kimiray.test"
TERMINAL = {"succeeded", "failed", "cancelled"}


# ------------------------------------------------------------------------------------------------------------
# The fake server
# ------------------------------------------------------------------------------------------------------------
def _script(task_type: str, task_input: Any) -> list[tuple[str, dict[str, Any]]]:
    """The events a task of each type goes through after ``queued``."""
    if task_type == "echo":  # 5 events in all: queued, running, progress 1/2, progress 2/2, succeeded
        return [("status", {"status": "running", "attempt": 1}),
                ("progress", {"done": 1, "total": 2, "message": "chunk 1 done"}),
                ("progress", {"done": 2, "total": 2, "message": "chunk 2 done"}),
                ("status", {"status": "succeeded"})]
    if task_type == "fail":
        return [("status", {"status": "running", "attempt": 1}),
                ("log", {"level": "error", "message": "parser crashed"}),
                ("status", {"status": "failed", "error": {"code": "boom", "message": "it broke"}})]
    if task_type == "slow":  # never ends
        return [("status", {"status": "running", "attempt": 1}),
                ("progress", {"done": 1, "total": 10, "message": "page 1"})]
    raise AssertionError(task_type)


class FakeServer:
    def __init__(self) -> None:
        self.owners = {KEY: "alice", OTHER_KEY: "bob"}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.pending: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.owner_of: dict[str, str] = {}
        self.seen_keys: dict[tuple[str, str], str] = {}
        self.requests: list[httpx.Request] = []
        self.forced: list[tuple[int, dict[str, str]]] = []  # answers forced on the next requests
        self.connect_failures = 0  # the next N requests fail to connect
        self.drop_after: dict[str, int] = {}  # task id -> events sent before the connection breaks (once)
        self.ignore_last_event_id = False  # a sloppy server that replays from the start
        self.events_broken = False
        self.advance_on_get = False
        self.sessions: dict[str, dict[str, Any]] = {}
        self.session_log: dict[str, list[dict[str, Any]]] = {}
        self.chat_bodies: list[dict[str, Any]] = []
        self.sleeps: list[float] = []  # what the sync clients were told to sleep
        self.clock = 1_780_000_000.0
        self.next_id = 0

    # -- transports ---------------------------------------------------------------------------------------------
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(lambda request: self.handle(request, is_async=False))

    def async_transport(self) -> httpx.MockTransport:
        async def handler(request: httpx.Request) -> httpx.Response:
            return self.handle(request, is_async=True)

        return httpx.MockTransport(handler)

    def client(self, key: str = KEY, **kwargs: Any) -> Client:
        kwargs.setdefault("sleep", self.sleeps.append)
        return Client(BASE, key, transport=self.transport(), **kwargs)

    def async_client(self, key: str = KEY, **kwargs: Any) -> AsyncClient:
        async def nosleep(seconds: float) -> None:
            self.async_sleeps.append(seconds)

        self.async_sleeps: list[float] = []
        kwargs.setdefault("sleep", nosleep)
        return AsyncClient(BASE + "/v1", key, transport=self.async_transport(), **kwargs)

    # -- helpers ------------------------------------------------------------------------------------------------
    def _tick(self) -> float:
        self.clock += 1.0
        return self.clock

    @staticmethod
    def error(status: int, code: str, message: str, param: str | None = None,
              headers: dict[str, str] | None = None) -> httpx.Response:
        kind = {401: "authentication_error", 404: "not_found_error", 422: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable_error"}.get(status, "server_error")
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return httpx.Response(status, json=body, headers={"X-Request-Id": "req-123", **(headers or {})})

    def _emit(self, task_id: str, kind: str, data: dict[str, Any]) -> None:
        log = self.events[task_id]
        event = {"id": len(log) + 1, "task_id": task_id, "type": kind, "data": data, "ts": self._tick()}
        log.append(event)
        task = self.tasks[task_id]
        task["last_event_id"] = event["id"]
        task["updated_at"] = event["ts"]
        if kind == "status":
            task["status"] = data["status"]
            if data["status"] == "running":
                task["started_at"] = event["ts"]
                task["attempts"] = data.get("attempt", 1)
            if data["status"] in TERMINAL:
                task["finished_at"] = event["ts"]
                if data["status"] == "succeeded":
                    task["result"] = {"echo": task["input"], "pages": 2}
                if data.get("error"):
                    task["error"] = data["error"]
        elif kind == "progress":
            task["progress"] = dict(data)

    def advance(self, task_id: str, steps: int | None = None) -> None:
        """Run the task's script (all of it, or ``steps`` events)."""
        pending = self.pending[task_id]
        for _ in range(len(pending) if steps is None else min(steps, len(pending))):
            kind, data = pending.pop(0)
            self._emit(task_id, kind, data)

    def _visible(self, task_id: str, owner: str) -> dict[str, Any] | None:
        return self.tasks.get(task_id) if self.owner_of.get(task_id) == owner else None

    # -- routing ------------------------------------------------------------------------------------------------
    def handle(self, request: httpx.Request, *, is_async: bool) -> httpx.Response:
        self.requests.append(request)
        if self.connect_failures:
            self.connect_failures -= 1
            raise httpx.ConnectError("connection refused", request=request)
        if self.forced:
            status, headers = self.forced.pop(0)
            return self.error(status, "forced", f"forced {status}", headers=headers)
        path = request.url.path
        if path == "/readyz":
            return httpx.Response(200, json={"status": "ready"})
        auth = request.headers.get("authorization", "")
        owner = self.owners.get(auth.removeprefix("Bearer "))
        if owner is None:
            return self.error(401, "invalid_api_key", "a valid API key is required")
        parts = path.strip("/").split("/")[1:]  # after "v1"
        method = request.method
        body = json.loads(request.content) if request.content else None
        if parts == ["tasks"] and method == "POST":
            return self.submit(owner, body)
        if parts == ["tasks"] and method == "GET":
            return self.list(owner, request.url.params)
        if parts[:1] == ["tasks"] and len(parts) >= 2:
            task = self._visible(parts[1], owner)
            if task is None:
                return self.error(404, "task_not_found", f"no task {parts[1]}")
            if len(parts) == 2 and method == "GET":
                if self.advance_on_get:
                    self.advance(task["id"], 1)
                return httpx.Response(200, json=task)
            if parts[2:] == ["cancel"] and method == "POST":
                return self.cancel(task)
            if parts[2:] == ["events"] and method == "GET":
                return self.stream(task, request, is_async)
        if parts == ["chat", "completions"] and method == "POST":
            return self.chat(body, is_async)
        if parts[:1] == ["sessions"]:
            return self.session_route(parts[1:], method, body, request.url.params)
        return self.error(404, "not_found", f"no route {method} {path}")

    def submit(self, owner: str, body: dict[str, Any]) -> httpx.Response:
        if body["type"] not in ("echo", "fail", "slow"):
            return self.error(422, "unknown_task_type", f"unknown task type {body['type']!r}", param="type")
        key = body.get("idempotency_key")
        if key and (owner, key) in self.seen_keys:
            task = self.tasks[self.seen_keys[(owner, key)]]
            return httpx.Response(200, json={**task, "created": False})
        self.next_id += 1
        task_id = f"task_{self.next_id:04d}"
        now = self._tick()
        self.tasks[task_id] = {
            "id": task_id, "type": body["type"], "status": "queued", "input": body.get("input"),
            "options": body.get("options") or {}, "idempotency_key": key, "session_id": None,
            "created_at": now, "updated_at": now, "started_at": None, "finished_at": None, "attempts": 0,
            "max_attempts": 3, "progress": None, "result": None, "error": None, "cancel_requested": False,
            "expires_at": now + 86400, "last_event_id": 0, "shard": 7,  # "shard": a field the SDK doesn't know
        }
        self.events[task_id] = []
        self.owner_of[task_id] = owner
        self.pending[task_id] = _script(body["type"], body.get("input"))
        if key:
            self.seen_keys[(owner, key)] = task_id
        self._emit(task_id, "status", {"status": "queued"})
        return httpx.Response(202, json={**self.tasks[task_id], "created": True})

    def list(self, owner: str, params: httpx.QueryParams) -> httpx.Response:
        rows = [t for t in reversed(list(self.tasks.values())) if self.owner_of[t["id"]] == owner]
        if params.get("status"):
            rows = [t for t in rows if t["status"] == params["status"]]
        if params.get("type"):
            rows = [t for t in rows if t["type"] == params["type"]]
        start = int(params.get("cursor") or 0)
        limit = int(params.get("limit") or 50)
        page = rows[start:start + limit]
        more = start + limit < len(rows)
        return httpx.Response(200, json={"object": "list", "data": page,
                                         "next_cursor": str(start + limit) if more else None})

    def cancel(self, task: dict[str, Any]) -> httpx.Response:
        if task["status"] not in TERMINAL:
            task["cancel_requested"] = True
            self.pending[task["id"]] = []
            self._emit(task["id"], "cancel_requested", {})
            self._emit(task["id"], "status", {"status": "cancelled", "reason": "cancel requested"})
        return httpx.Response(200, json=task)

    def stream(self, task: dict[str, Any], request: httpx.Request, is_async: bool) -> httpx.Response:
        if self.events_broken:
            return self.error(500, "internal_error", "event store down")
        self.advance(task["id"])  # watching a task makes it run
        after = int(request.headers.get("last-event-id") or request.url.params.get("after") or 0)
        if self.ignore_last_event_id:
            after = 0
        chunks = [b": keepalive\n\n"]
        for event in self.events[task["id"]]:
            if event["id"] > after:
                frame = f"id: {event['id']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
                chunks += [frame[:7], frame[7:]]  # frames split across network chunks
        drop = self.drop_after.pop(task["id"], None)
        failure = None
        if drop is not None:
            chunks = chunks[: 1 + 2 * drop]
            failure = httpx.ReadError("connection reset by peer")
        return self.sse(chunks, failure, is_async)

    @staticmethod
    def sse(chunks: list[bytes], failure: Exception | None, is_async: bool) -> httpx.Response:
        def sync_body():
            yield from chunks
            if failure:
                raise failure

        async def async_body():
            for chunk in chunks:
                yield chunk
            if failure:
                raise failure

        return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                              content=async_body() if is_async else sync_body())

    def chat(self, body: dict[str, Any], is_async: bool) -> httpx.Response:
        self.chat_bodies.append(body)
        session_id = body.get("session_id")
        if session_id is not None:
            if session_id not in self.sessions:
                return self.error(404, "session_not_found", f"no session {session_id}")
            log = self.session_log[session_id]
            for m in [*body["messages"], {"role": "assistant", "content": "Hello"}]:
                log.append({"index": len(log), "role": m["role"], "content": m["content"], "token_count": 3,
                            "ts": self._tick()})
            self.sessions[session_id]["message_count"] = len(log)
        usage = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
        if not body.get("stream"):
            return httpx.Response(200, json={
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Hello",
                                         "reasoning_content": "thinking..."}}],
                "usage": usage, "session_id": session_id,
            })

        def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
            obj = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                   "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
                   **extra}
            return f"data: {json.dumps(obj)}\n\n".encode()

        chunks = [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "hmm"}),
                  chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({}, "stop"),
                  chunk(None, usage=usage), b"data: [DONE]\n\n"]
        return FakeServer.sse(chunks, None, is_async)

    def session_route(self, parts: list[str], method: str, body: Any, params: httpx.QueryParams) -> httpx.Response:
        if not parts and method == "POST":
            self.next_id += 1
            sid = f"sess_{self.next_id}"
            now = self._tick()
            self.sessions[sid] = {"id": sid, "parent_id": None, "created_at": now, "updated_at": now,
                                  "expires_at": now + (body.get("ttl_s") or 3600), "metadata": body["metadata"],
                                  "token_count": 0, "message_count": 0}
            self.session_log[sid] = []
            return httpx.Response(201, json=self.sessions[sid])
        session = self.sessions.get(parts[0]) if parts else None
        if session is None:
            return self.error(404, "session_not_found", "no such session")
        if len(parts) == 1 and method == "GET":
            return httpx.Response(200, json=session)
        if len(parts) == 1 and method == "DELETE":
            del self.sessions[parts[0]]
            return httpx.Response(204)
        if parts[1:] == ["messages"]:
            log = self.session_log[parts[0]]
            start, end = int(params.get("start") or 0), params.get("end")
            return httpx.Response(200, json={"object": "list",
                                             "data": log[start:int(end) if end is not None else None]})
        return self.error(404, "not_found", "no route")

    def stream_requests(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path.endswith("/events")]


@pytest.fixture
def fake() -> FakeServer:
    return FakeServer()


# ------------------------------------------------------------------------------------------------------------
# Tasks: submit / get / list / cancel
# ------------------------------------------------------------------------------------------------------------
def test_submit_get_and_idempotency(fake: FakeServer) -> None:
    with fake.client() as kc:
        task = kc.submit("echo", {"text": "hi"}, options={"pages": 2})
        assert task.created is True and task.status == "queued" and not task.done
        assert task.shard == 7  # unknown fields survive
        sent = json.loads(fake.requests[-1].content)
        assert sent["type"] == "echo" and sent["options"] == {"pages": 2}
        assert len(sent["idempotency_key"]) == 36  # a uuid4 was generated
        assert fake.requests[-1].headers["authorization"] == f"Bearer {KEY}"

        again = kc.submit("echo", {"text": "hi"}, idempotency_key=sent["idempotency_key"])
        assert again.id == task.id and again.created is False

        fetched = kc.get(task.id)
        assert fetched.id == task.id and fetched.input == {"text": "hi"} and fetched.created is None
        assert fetched.max_attempts == 3 and fetched.last_event_id == 1


def test_list_tasks_pages_and_filters(fake: FakeServer) -> None:
    with fake.client() as kc:
        ids = [kc.submit("echo" if i % 2 else "slow", {"i": i}).id for i in range(5)]
        page = kc.list_tasks(limit=2)
        assert [t.id for t in page.data] == ids[::-1][:2] and page.next_cursor == "2"
        assert [t.id for t in kc.iter_tasks(page_size=2)] == ids[::-1]
        assert {t.type for t in kc.iter_tasks(type="slow")} == {"slow"}
        assert fake.requests[-1].url.params["type"] == "slow"
        assert kc.list_tasks(status="succeeded").data == []


def test_cancel(fake: FakeServer) -> None:
    with fake.client() as kc:
        task = kc.submit("slow")
        cancelled = kc.cancel(task.id)
        assert cancelled.status == "cancelled" and cancelled.cancel_requested and cancelled.done
        with pytest.raises(TaskCancelledError) as info:
            kc.wait(task.id)
        assert info.value.task.status == "cancelled"


# ------------------------------------------------------------------------------------------------------------
# Errors and retries
# ------------------------------------------------------------------------------------------------------------
def test_error_mapping(fake: FakeServer) -> None:
    with fake.client("sk-wrong") as bad, pytest.raises(AuthenticationError) as auth:
        bad.list_tasks()
    assert auth.value.status == 401 and auth.value.code == "invalid_api_key" and auth.value.request_id == "req-123"

    with fake.client(OTHER_KEY) as bob, fake.client() as alice:
        theirs = bob.submit("echo")
        with pytest.raises(NotFoundError):
            alice.get(theirs.id)  # another key's task reads as not found
        with pytest.raises(NotFoundError):
            alice.cancel("task_nope")
        before = len(fake.requests)
        with pytest.raises(InvalidRequestError) as invalid:
            alice.submit("translate_poem", {})
        assert invalid.value.code == "unknown_task_type" and invalid.value.param == "type"
        assert invalid.value.status == 422 and "translate_poem" in str(invalid.value)
        assert len(fake.requests) == before + 1  # a 4xx is never retried
    assert fake.sleeps == []


def test_rate_limit_and_unavailable_retry_with_retry_after(fake: FakeServer) -> None:
    with fake.client(max_retries=2, max_retry_wait=5.0) as kc:
        fake.forced = [(429, {"Retry-After": "2"}), (503, {"Retry-After": "60"})]
        task = kc.submit("echo")
        assert task.created is True
        assert fake.sleeps == [2.0, 5.0]  # Retry-After honoured, capped

        fake.forced = [(503, {"Retry-After": "1"})] * 3
        with pytest.raises(ServiceUnavailableError) as info:
            kc.get(task.id)
        assert info.value.retry_after == 1.0 and info.value.status == 503

        fake.forced = [(429, {})] * 3
        with pytest.raises(RateLimitError):
            kc.list_tasks()
        assert fake.sleeps[-2:] == [0.5, 1.0]  # no Retry-After: backoff


def test_submit_retry_reuses_idempotency_key(fake: FakeServer) -> None:
    with fake.client() as kc:
        fake.forced = [(503, {"Retry-After": "0"})]
        task = kc.submit("echo")
        keys = [json.loads(r.content)["idempotency_key"] for r in fake.requests if r.method == "POST"]
        assert len(keys) == 2 and keys[0] == keys[1] == task.idempotency_key


def test_connection_errors(fake: FakeServer) -> None:
    with fake.client(max_retries=2) as kc:
        fake.connect_failures = 2
        assert kc.submit("echo").created  # third try gets through
        fake.connect_failures = 5
        with pytest.raises(ConnectionError) as info:
            kc.list_tasks()
        assert info.value.status is None and "cannot reach" in str(info.value)
    fake.connect_failures = 0
    fake.forced = [(503, {})]
    with Client(BASE, KEY, transport=fake.transport()) as kc:
        assert kc.health() is False  # not ready: no retry, no raise
        assert kc.health() is True


def test_a_401_says_how_to_pass_a_key() -> None:
    err = error_for(401, {"error": {"message": "Missing API key.", "type": "authentication_error"}})
    assert isinstance(err, AuthenticationError) and err.status == 401
    assert "KIMIRAY_API_KEY" in str(err) and "--api-key" in str(err) and "Missing API key." in str(err)
    assert "KIMIRAY_API_KEY" not in str(error_for(403, {"error": {"message": "not yours"}}))


def test_error_for_stream_error_body() -> None:
    err = error_for(None, {"error": {"message": "overloaded", "type": "service_unavailable_error",
                                     "code": "overloaded"}})
    assert isinstance(err, ServiceUnavailableError) and err.status == 503
    assert isinstance(error_for(418, None, fallback="teapot"), KimirayError)


def test_url_and_key_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIMIRAY_API_KEY", "sk-env")
    for url in ("http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"):
        kc = Client(url)
        assert kc.base_url == "http://h:8000" and kc.api_key == "sk-env"
        kc.close()


# ------------------------------------------------------------------------------------------------------------
# Event streams and wait
# ------------------------------------------------------------------------------------------------------------
def test_sse_decoder() -> None:
    decoder = SSEDecoder()
    lines = [": keepalive", "", "id: 3", "event: log", "data: {\"a\":", "data: 1}", "", "data: tail"]
    out = [e for e in map(decoder.feed, lines) if e is not None]
    assert [(e.id, e.event, e.data) for e in out] == [("3", "log", "{\"a\":\n1}")]
    assert decoder.flush().data == "tail"


def test_stream_events_in_order(fake: FakeServer) -> None:
    with fake.client() as kc:
        task = kc.submit("echo")
        events = list(kc.stream_events(task.id))
        assert [e.id for e in events] == [1, 2, 3, 4, 5]
        assert events[-1].is_terminal and events[-1].status == "succeeded"
        assert events[2].progress == Progress(done=1, total=2, message="chunk 1 done")
        assert all(e.task_id == task.id for e in events)
        assert [e.id for e in kc.stream_events(task.id, after=3)] == [4, 5]


def test_stream_resumes_after_drop(fake: FakeServer) -> None:
    with fake.client() as kc:
        task = kc.submit("echo")
        fake.drop_after[task.id] = 2  # the first connection breaks after 2 of the 5 events
        ids = [e.id for e in kc.stream_events(task.id)]
    assert ids == [1, 2, 3, 4, 5]
    streams = fake.stream_requests()
    assert len(streams) == 2
    assert "last-event-id" not in streams[0].headers and streams[1].headers["last-event-id"] == "2"
    assert fake.sleeps == [0.25]  # one short backoff before reconnecting


class _ClosableStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that records whether the client closed it."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def __iter__(self):
        yield from self.chunks

    async def __aiter__(self):
        for chunk in self.chunks:
            yield chunk

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def test_leaving_an_event_stream_early_closes_it() -> None:
    """Both clients run the same request plans; a consumer that stops early still has its connection closed."""
    chunks = [f'id: {i}\ndata: {{"id": {i}, "type": "progress", "data": {{}}}}\n\n'.encode() for i in (1, 2, 3)]
    bodies: list[_ClosableStream] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(_ClosableStream(chunks))
        return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, stream=bodies[-1])

    async def handle(request: httpx.Request) -> httpx.Response:
        return handler(request)

    with Client(BASE, KEY, transport=httpx.MockTransport(handler)) as kc:
        events = kc.stream_events("task_1")
        assert next(events).id == 1
        events.close()
    assert len(bodies) == 1 and bodies[0].closed

    async def main() -> None:
        async with AsyncClient(BASE, KEY, transport=httpx.MockTransport(handle)) as kc:
            events = kc.stream_events("task_1")
            assert (await anext(events)).id == 1
            await events.aclose()

    asyncio.run(main())
    assert len(bodies) == 2 and bodies[1].closed


def test_stream_never_repeats_when_server_replays(fake: FakeServer) -> None:
    fake.ignore_last_event_id = True
    with fake.client() as kc:
        task = kc.submit("echo")
        fake.drop_after[task.id] = 3
        assert [e.id for e in kc.stream_events(task.id)] == [1, 2, 3, 4, 5]


def test_stream_gives_up_after_bounded_reconnects(fake: FakeServer) -> None:
    with fake.client(max_reconnects=3) as kc:
        task = kc.submit("slow")  # its stream ends without a final event, every time
        with pytest.raises(ConnectionError, match="lost 4 times"):
            list(kc.stream_events(task.id))
    assert fake.sleeps == [0.25, 0.5, 1.0]


def test_stream_of_finished_task_after_last_event_ends(fake: FakeServer) -> None:
    with fake.client() as kc:
        task = kc.submit("echo")
        fake.advance(task.id)
        assert list(kc.stream_events(task.id, after=5)) == []


def test_wait_success_uses_stream(fake: FakeServer) -> None:
    with fake.client() as kc:
        task = kc.submit("echo", {"x": 1})
        done = kc.wait(task.id, timeout=10)
    assert done.status == "succeeded" and done.result == {"echo": {"x": 1}, "pages": 2}
    assert fake.stream_requests()[0].headers["last-event-id"] == "1"  # starts after what get() showed


def test_wait_failed_raises(fake: FakeServer) -> None:
    with fake.client() as kc:
        task = kc.submit("fail")
        with pytest.raises(TaskFailedError) as info:
            kc.wait(task.id)
        assert info.value.task.error.code == "boom" and info.value.code == "boom"
        assert "it broke" in str(info.value)
        assert kc.wait(task.id, raise_on_failure=False).status == "failed"


def test_wait_timeout(fake: FakeServer) -> None:
    with fake.client(sleep=lambda s: time.sleep(min(s, 0.005))) as kc:
        task = kc.submit("slow")
        started = time.monotonic()
        with pytest.raises(WaitTimeoutError) as info:
            kc.wait(task.id, timeout=0.2)
    assert time.monotonic() - started < 2.0
    assert info.value.task.status == "running" and info.value.task.progress.done == 1


def test_wait_falls_back_to_polling(fake: FakeServer) -> None:
    fake.events_broken = True
    fake.advance_on_get = True
    with fake.client() as kc:
        task = kc.submit("echo")
        assert kc.wait(task.id, poll_interval=0.5).status == "succeeded"
    assert fake.sleeps == [0.5, 0.75]  # growing poll interval


# ------------------------------------------------------------------------------------------------------------
# Chat, images, sessions
# ------------------------------------------------------------------------------------------------------------
def _png_bytes(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def test_chat_plain(fake: FakeServer) -> None:
    with fake.client() as kc:
        result = kc.chat("Say hello", max_tokens=8, temperature=0.0, seed=1)
        assert result.text == "Hello" and str(result) == "Hello"
        assert result.reasoning == "thinking..." and result.finish_reason == "stop"
        assert result.usage["total_tokens"] == 13 and result.raw["id"] == "chatcmpl-1"
        body = fake.chat_bodies[-1]
        assert body == {"model": "kimi-vl", "messages": [{"role": "user", "content": "Say hello"}],
                        "max_tokens": 8, "temperature": 0.0, "seed": 1}

        kc.chat([{"role": "system", "content": "be terse"}, {"role": "user", "content": "hi"}],
                json_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
        fmt = fake.chat_bodies[-1]["response_format"]
        assert fmt["type"] == "json_schema" and fmt["json_schema"]["schema"]["properties"]["a"]["type"] == "integer"

        from pydantic import BaseModel

        class Answer(BaseModel):
            a: int

        kc.chat("hi", json_schema=Answer)
        spec = fake.chat_bodies[-1]["response_format"]["json_schema"]
        assert spec["name"] == "Answer" and spec["schema"]["required"] == ["a"]


def test_chat_stream(fake: FakeServer) -> None:
    with fake.client() as kc:
        stream = kc.chat("Say hello", stream=True)
        assert list(stream) == ["Hel", "lo"]
        assert stream.result.text == "Hello" and stream.result.reasoning == "hmm"
        assert stream.result.finish_reason == "stop" and stream.result.usage["completion_tokens"] == 2
    body = fake.chat_bodies[-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_chat_stream_error_event() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        err = {"error": {"message": "generation failed", "type": "server_error", "code": "generation_failed"}}
        return httpx.Response(200, content=(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
                                            b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n"))

    with Client(BASE, KEY, transport=httpx.MockTransport(handler)) as kc:
        stream = kc.chat("x", stream=True)
        got: list[str] = []
        with pytest.raises(KimirayError) as info:
            got.extend(stream)
    assert got == ["a"] and info.value.code == "generation_failed" and info.value.status == 500


def test_images_encoding(fake: FakeServer, tmp_path: Path) -> None:
    from PIL import Image

    png = _png_bytes()
    path = tmp_path / "shot.png"
    path.write_bytes(png)
    pil = Image.new("RGB", (2, 2), (0, 0, 255))
    with fake.client() as kc:
        kc.chat("What is shown?", images=[path, str(path), png, pil, "https://example.com/a.jpg"])
    content = fake.chat_bodies[-1]["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url"] * 5 + ["text"]
    assert content[-1] == {"type": "text", "text": "What is shown?"}
    urls = [p["image_url"]["url"] for p in content[:5]]
    expected = "data:image/png;base64," + base64.b64encode(png).decode()
    assert urls[0] == urls[1] == urls[2] == expected
    assert urls[3].startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(urls[3].split(",", 1)[1])))
    assert decoded.size == (2, 2)
    assert urls[4] == "https://example.com/a.jpg"


def test_images_go_to_last_user_turn(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "second"}]}]
    out = build_messages(messages, images=_png_bytes())
    assert out[0]["content"] == "first" and messages[2]["content"] == [{"type": "text", "text": "second"}]
    assert [p["type"] for p in out[2]["content"]] == ["image_url", "text"]
    with pytest.raises(ValueError, match="cannot read image"):
        image_url(str(tmp_path / "missing.png"))
    assert image_url(b"\xff\xd8\xff\xe0rest").startswith("data:image/jpeg;base64,")


def test_sessions(fake: FakeServer) -> None:
    with fake.client() as kc:
        session = kc.create_session({"user": "ann"}, ttl_s=60)
        assert session.metadata == {"user": "ann"} and session.message_count == 0
        result = kc.chat("remember 7", session_id=session.id)
        assert result.session_id == session.id and fake.chat_bodies[-1]["session_id"] == session.id
        assert kc.get_session(session.id).message_count == 2
        messages = kc.session_messages(session.id)
        assert [(m.index, m.role) for m in messages] == [(0, "user"), (1, "assistant")]
        assert [m.index for m in kc.session_messages(session.id, start=1)] == [1]
        kc.delete_session(session.id)
        with pytest.raises(NotFoundError):
            kc.get_session(session.id)


# ------------------------------------------------------------------------------------------------------------
# Progress display
# ------------------------------------------------------------------------------------------------------------
def test_render_bar_and_events() -> None:
    assert render_bar(Progress(done=3, total=6, message="chunk 3 done")) == "[#####.....] 3/6 chunk 3 done"
    assert render_bar(Progress(done=4, total=None)) == "4"
    event = TaskEvent(id=9, type="status", data={"status": "failed", "error": {"code": "boom", "message": "x"}})
    assert render_event(event) == "status: failed - boom: x"
    assert render_event(TaskEvent(id=1, type="page_done", data={"page": 2})) == 'page_done: {"page":2}'


def test_progress_printer_tty_and_plain() -> None:
    events = [TaskEvent(id=1, type="progress", data={"done": 1, "total": 2, "message": "a"}),
              TaskEvent(id=2, type="log", data={"message": "note"}),
              TaskEvent(id=3, type="progress", data={"done": 2, "total": 2}),
              TaskEvent(id=4, type="status", data={"status": "succeeded"})]
    tty, plain = io.StringIO(), io.StringIO()
    with ProgressPrinter(tty, tty=True, width=4) as p:
        for e in events:
            p.handle(e)
    with ProgressPrinter(plain, tty=False, width=4) as p:
        for e in events:
            p.handle(e)
    # the log line overwrites the bar (padded to its length), then the bar is drawn again below it
    assert tty.getvalue() == ("\r[##..] 1/2 a\rlog: note   \n\r[##..] 1/2 a\r[####] 2/2  "
                              "\rstatus: succeeded\n")
    assert plain.getvalue() == "[##..] 1/2 a\nlog: note\n[####] 2/2\nstatus: succeeded\n"


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def cli(fake: FakeServer, monkeypatch: pytest.MonkeyPatch):
    made: list[tuple[str | None, str | None]] = []

    def make_client(url: str | None, api_key: str | None) -> Client:
        made.append((url, api_key))
        return Client(BASE, api_key or KEY, transport=fake.transport(), sleep=lambda s: None)

    monkeypatch.setattr(task_cli, "make_client", make_client)
    monkeypatch.setattr(task_cli, "made", made, raising=False)
    return task_cli.main


def test_cli_submit_file(cli, fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "contract.txt"
    doc.write_bytes(b"party A pays party B")
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    code = cli(["submit", "echo", str(doc), "--schema", str(schema), "--option", "pages=3",
                "--option", "lang=en", "--option", "session_id=sess_1", "--url", "http://elsewhere:9000",
                "--api-key", "sk-test"])
    out, err = capsys.readouterr()
    assert code == 0
    result = json.loads(out)
    assert result["echo"]["file"]["name"] == "contract.txt"
    sent = json.loads(next(r.content for r in fake.requests if r.method == "POST"))
    assert sent["input"]["file"] == {"name": "contract.txt", "content_type": "text/plain",
                                     "data": base64.b64encode(b"party A pays party B").decode()}
    assert sent["input"]["schema"] == {"type": "object"}
    # --option feeds the input (validated by the agent's schema on the server); session_id is the task option
    assert sent["input"]["pages"] == 3 and sent["input"]["lang"] == "en" and sent["options"] == {"session_id": "sess_1"}
    assert "task_0001" in err and "chunk 2 done" in err and "status: succeeded" in err
    assert task_cli.made == [("http://elsewhere:9000", "sk-test")]


def test_cli_submit_url_output_and_no_wait(cli, fake: FakeServer, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "result.json"
    assert cli(["submit", "echo", "https://example.com/c.pdf", "--schema", '{"type":"object"}',
                "--output", str(out_file)]) == 0
    out, _ = capsys.readouterr()
    assert out == "" and json.loads(out_file.read_text())["echo"] == {"url": "https://example.com/c.pdf",
                                                                       "schema": {"type": "object"}}
    assert cli(["submit", "slow", "https://example.com/x", "--no-wait", "--idempotency-key", "k1"]) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == "task_0002"
    assert json.loads(fake.requests[-1].content)["idempotency_key"] == "k1"


def test_cli_submit_failures(cli, fake: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["submit", "fail", "https://example.com/x"]) == 1
    _, err = capsys.readouterr()
    assert "failed: boom: it broke" in err

    assert cli(["submit", "echo", str(tmp_path / "nope.pdf")]) == 2
    _, err = capsys.readouterr()
    assert "no such file" in err and "Traceback" not in err

    assert cli(["submit", "echo", "https://x", "--schema", "{not json"]) == 2
    assert cli(["submit", "echo", "https://x", "--option", "novalue"]) == 2
    assert cli(["submit", "poem", "https://x"]) == 2
    _, err = capsys.readouterr()
    assert "unknown task type" in err
    with pytest.raises(SystemExit) as usage:
        cli(["submit"])
    assert usage.value.code == 2


def test_cli_submit_local_hook(cli, fake: FakeServer, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    made = []

    class LocalRuntime(Client):
        def __init__(self) -> None:
            super().__init__(BASE, KEY, transport=fake.transport(), sleep=lambda s: None)
            made.append(self)

    monkeypatch.setitem(sys.modules, "kimiray.local", types.SimpleNamespace(LocalRuntime=LocalRuntime))
    assert cli(["submit", "echo", "https://example.com/a", "--local"]) == 0
    assert len(made) == 1 and task_cli.made == []


def test_cli_tasks_commands(cli, fake: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    with fake.client() as kc:
        done = kc.submit("echo", {"n": 1})
        kc.wait(done.id)
        running = kc.submit("slow")
        fake.advance(running.id)
    assert cli(["tasks", "ls"]) == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "STATUS", "PROGRESS", "CREATED"]
    assert lines[1].split()[:4] == [running.id, "slow", "running", "1/10"]
    assert lines[2].split()[:4] == [done.id, "echo", "succeeded", "2/2"]
    assert len(lines) == 3

    assert cli(["tasks", "ls", "--limit", "1"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2 and "--cursor 1" in err

    assert cli(["tasks", "get", done.id]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out)["result"]["pages"] == 2

    assert cli(["tasks", "events", done.id, "--after", "3"]) == 0
    out, _ = capsys.readouterr()
    assert [json.loads(line)["id"] for line in out.splitlines()] == [4, 5]

    assert cli(["tasks", "events", running.id, "--text"]) == 0  # no --follow: what is logged so far
    out, _ = capsys.readouterr()
    assert out.splitlines() == ["   1 status: queued", "   2 status: running (attempt 1)",
                                "   3 [#.........] 1/10 page 1"]

    assert cli(["tasks", "cancel", running.id]) == 0
    out, _ = capsys.readouterr()
    assert out.strip() == f"{running.id}: cancelled"

    assert cli(["tasks", "events", running.id, "--follow", "--after", "3"]) == 0
    out, _ = capsys.readouterr()
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["cancel_requested", "status"]

    assert cli(["tasks", "get", "task_9999"]) == 2
    _, err = capsys.readouterr()
    assert "no task task_9999" in err


# ------------------------------------------------------------------------------------------------------------
# Async client: the same flows
# ------------------------------------------------------------------------------------------------------------
def test_async_tasks_flow(fake: FakeServer) -> None:
    async def main() -> None:
        async with fake.async_client() as kc:
            task = await kc.submit("echo", {"a": 1})
            assert task.created and (await kc.get(task.id)).status == "queued"
            fake.drop_after[task.id] = 2
            ids = [e.id async for e in kc.stream_events(task.id)]
            assert ids == [1, 2, 3, 4, 5]
            assert fake.stream_requests()[-1].headers["last-event-id"] == "2"
            assert (await kc.wait(task.id)).result["pages"] == 2

            other = await kc.submit("echo", {"a": 2})
            assert (await kc.wait(other.id, timeout=5)).status == "succeeded"
            failing = await kc.submit("fail")
            with pytest.raises(TaskFailedError):
                await kc.wait(failing.id)
            slow = await kc.submit("slow")
            with pytest.raises(WaitTimeoutError):
                await kc.wait(slow.id, timeout=0.05)
            page = await kc.list_tasks(limit=2)
            assert len(page.data) == 2 and page.next_cursor
            assert len([t async for t in kc.iter_tasks(page_size=2)]) == 4
            assert (await kc.cancel(slow.id)).status == "cancelled"

            fake.forced = [(503, {"Retry-After": "3"})]
            assert (await kc.get(task.id)).done
            assert fake.async_sleeps[-1] == 3.0
            with pytest.raises(NotFoundError):
                await kc.get("task_nope")
            assert await kc.health() is True

    asyncio.run(main())


def test_async_chat(fake: FakeServer) -> None:
    async def main() -> None:
        async with fake.async_client() as kc:
            result = await kc.chat("hello", images=[_png_bytes()])
            assert result.text == "Hello" and result.reasoning == "thinking..."
            assert fake.chat_bodies[-1]["messages"][0]["content"][0]["type"] == "image_url"
            stream = await kc.chat("hello", stream=True)
            assert [d async for d in stream] == ["Hel", "lo"]
            assert stream.result.usage["total_tokens"] == 13
            session = await kc.create_session()
            await kc.chat("x", session_id=session.id)
            assert len(await kc.session_messages(session.id)) == 2
            await kc.delete_session(session.id)

    asyncio.run(main())


def test_task_model_tolerates_extras() -> None:
    task = Task.model_validate({"id": "t", "type": "x", "status": "succeeded", "brand_new": [1],
                                "progress": {"done": 1, "total": 1, "message": None, "eta_s": 3}})
    assert task.done and task.brand_new == [1] and task.progress.fraction == 1.0
    assert not Task(id="t", status="running").done
