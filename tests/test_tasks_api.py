"""REST task and session API on the real ingress app with the tiny engine and the embedded store (no Ray)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.task_server import task_server, wait_for_status

KEY_A, KEY_B = "sk-test-alpha-0001", "sk-test-bravo-0002"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    from engine.runtime.engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)
    stores = tmp_path_factory.mktemp("stores")
    with task_server(f"sqlite:///{stores}", f"{KEY_A},{KEY_B}", engine=engine) as url:
        yield url


def sse_events(url: str, key: str, task_id: str, last_event_id: int | None = None,
               stop_after: int | None = None) -> list[dict[str, Any]]:
    """Read the event stream; ``stop_after`` drops the connection after that many events."""
    headers = auth(key)
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    events: list[dict[str, Any]] = []
    with httpx.stream("GET", f"{url}/v1/tasks/{task_id}/events", headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for line in response.iter_lines():
            if line.startswith("id: "):
                current["id"] = int(line[4:])
            elif line.startswith("event: "):
                current["event"] = line[7:]
            elif line.startswith("data: "):
                current["data"] = json.loads(line[6:])
            elif line == "" and "data" in current:
                assert current["id"] == current["data"]["id"] and current["event"] == current["data"]["type"]
                events.append(current["data"])
                current = {}
                if stop_after is not None and len(events) >= stop_after:
                    break
    return events


def test_chat_task_runs_on_the_real_engine_and_streams_events(server: str) -> None:
    body = {"type": "chat", "input": {"messages": [{"role": "user", "content": "Describe the weather"}],
                                      "max_tokens": 6}}
    response = httpx.post(f"{server}/v1/tasks", json=body, headers=auth(KEY_A))
    assert response.status_code == 202, response.text
    task = response.json()
    assert task["status"] in ("queued", "running") and task["created"] is True
    assert response.headers["location"] == f"/v1/tasks/{task['id']}"
    events = sse_events(server, KEY_A, task["id"])
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["data"] == {"status": "queued"} and events[-1]["data"]["status"] == "succeeded"
    final = httpx.get(f"{server}/v1/tasks/{task['id']}", headers=auth(KEY_A)).json()
    assert final["status"] == "succeeded" and final["attempts"] == 1
    assert final["result"]["completion_tokens"] >= 1 and final["result"]["prompt_tokens"] > 5
    assert "owner" not in final and "lease_token" not in final


def test_sse_resume_with_last_event_id_misses_nothing(server: str) -> None:
    body = {"type": "sleepy", "input": {"steps": 6, "step_s": 0.05}}
    task = httpx.post(f"{server}/v1/tasks", json=body, headers=auth(KEY_A)).json()
    first = sse_events(server, KEY_A, task["id"], stop_after=3)  # the connection drops after 3 events
    rest = sse_events(server, KEY_A, task["id"], last_event_id=first[-1]["id"])
    ids = [e["id"] for e in first + rest]
    assert ids == list(range(1, len(ids) + 1))
    assert rest[-1]["data"]["status"] == "succeeded"
    assert sum(1 for e in first + rest if e["type"] == "progress") == 6
    # resuming after the end returns at once with nothing; ?after= works like the header
    started = time.monotonic()
    assert sse_events(server, KEY_A, task["id"], last_event_id=ids[-1]) == []
    assert time.monotonic() - started < 2
    with httpx.stream("GET", f"{server}/v1/tasks/{task['id']}/events?after=4", headers=auth(KEY_A)) as r:
        text = r.read().decode()
    assert "id: 5\n" in text and "id: 4\n" not in text


def test_idempotency_key_replay_returns_the_same_task(server: str) -> None:
    body = {"type": "sleepy", "input": {"steps": 1}, "idempotency_key": "order-42"}
    first = httpx.post(f"{server}/v1/tasks", json=body, headers=auth(KEY_A))
    second = httpx.post(f"{server}/v1/tasks", json=body, headers=auth(KEY_A))
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"] and second.json()["created"] is False
    # the same key under another API key is a different task
    other = httpx.post(f"{server}/v1/tasks", json=body, headers=auth(KEY_B))
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_cross_key_access_is_404(server: str) -> None:
    task = httpx.post(f"{server}/v1/tasks", json={"type": "sleepy", "input": {"steps": 1}}, headers=auth(KEY_A)).json()
    wait_for_status(server, KEY_A, task["id"], ("succeeded",))
    for method, path in (("GET", f"/v1/tasks/{task['id']}"), ("POST", f"/v1/tasks/{task['id']}/cancel"),
                         ("GET", f"/v1/tasks/{task['id']}/events")):
        r = httpx.request(method, f"{server}{path}", headers=auth(KEY_B))
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["code"] == "not_found"
    missing = httpx.get(f"{server}/v1/tasks/task_doesnotexist", headers=auth(KEY_B))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"  # same as foreign
    listed = httpx.get(f"{server}/v1/tasks", headers=auth(KEY_B)).json()["data"]
    assert task["id"] not in {t["id"] for t in listed}
    session_id = wait_for_status(server, KEY_A, task["id"], ("succeeded",))["session_id"]
    assert httpx.get(f"{server}/v1/sessions/{session_id}", headers=auth(KEY_B)).status_code == 404
    assert httpx.get(f"{server}/v1/sessions/{session_id}", headers=auth(KEY_A)).status_code == 200
    # a task of key B can't name key A's session either
    r = httpx.post(f"{server}/v1/tasks", json={"type": "chat", "input": {"messages": [
        {"role": "user", "content": "hi"}]}, "options": {"session_id": session_id}}, headers=auth(KEY_B))
    assert r.status_code == 404 and r.json()["error"]["param"] == "options.session_id"


@pytest.mark.parametrize("body, status, code, param", [
    ({"type": "nope", "input": {}}, 422, "unknown_task_type", "type"),
    ({"type": "sleepy", "input": {"steps": -1}}, 422, "invalid_input", "input.steps"),
    ({"type": "chat", "input": {"messages": []}}, 422, "invalid_input", "input.messages"),
    ({"type": "sleepy", "input": {}, "colour": "red"}, 422, "invalid_request", None),
    ({"input": {}}, 422, "invalid_request", None),
])
def test_bad_submissions_are_4xx_with_a_json_body(server: str, body: dict, status: int, code: str,
                                                  param: str | None) -> None:
    before = httpx.get(f"{server}/v1/tasks?limit=500", headers=auth(KEY_A)).json()["data"]
    r = httpx.post(f"{server}/v1/tasks", json=body, headers=auth(KEY_A))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    if param:
        assert error["param"] == param
    after = httpx.get(f"{server}/v1/tasks?limit=500", headers=auth(KEY_A)).json()["data"]
    assert len(after) == len(before)  # nothing was accepted


def test_no_key_is_401_and_body_not_json_is_422(server: str) -> None:
    assert httpx.post(f"{server}/v1/tasks", json={"type": "sleepy"}).status_code == 401
    r = httpx.post(f"{server}/v1/tasks", content=b"{not json", headers={**auth(KEY_A),
                                                                        "content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()


def test_cancel_queued_and_running_tasks(server: str) -> None:
    long = httpx.post(f"{server}/v1/tasks", json={"type": "sleepy", "input": {"steps": 400, "step_s": 0.05}},
                      headers=auth(KEY_A)).json()
    wait_for_status(server, KEY_A, long["id"], ("running",))
    cancelled = httpx.post(f"{server}/v1/tasks/{long['id']}/cancel", headers=auth(KEY_A)).json()
    assert cancelled["cancel_requested"] is True
    final = wait_for_status(server, KEY_A, long["id"], ("cancelled",), timeout=20)
    assert final["progress"]["done"] < 400
    events = sse_events(server, KEY_A, long["id"])
    assert events[-1]["data"]["status"] == "cancelled" and any(e["type"] == "cancel_requested" for e in events)
    # cancelling an ended task changes nothing
    again = httpx.post(f"{server}/v1/tasks/{long['id']}/cancel", headers=auth(KEY_A)).json()
    assert again["status"] == "cancelled"


def test_list_filters_and_pages(server: str) -> None:
    ids = [httpx.post(f"{server}/v1/tasks", json={"type": "sleepy", "input": {"steps": 1, "tag": f"p{i}"}},
                      headers=auth(KEY_B)).json()["id"] for i in range(7)]
    for task_id in ids:
        wait_for_status(server, KEY_B, task_id, ("succeeded",))
    seen: list[str] = []
    cursor = None
    while True:
        params = {"type": "sleepy", "status": "succeeded", "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{server}/v1/tasks", params=params, headers=auth(KEY_B)).json()
        seen += [t["id"] for t in page["data"]]
        assert all(t["type"] == "sleepy" and t["status"] == "succeeded" for t in page["data"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert set(ids) <= set(seen) and len(seen) == len(set(seen))
    assert seen.index(ids[-1]) < seen.index(ids[0])  # newest first
    bad = httpx.get(f"{server}/v1/tasks", params={"status": "sleeping"}, headers=auth(KEY_B))
    assert bad.status_code == 422


def test_task_types_lists_input_schemas(server: str) -> None:
    data = httpx.get(f"{server}/v1/task-types", headers=auth(KEY_A)).json()["data"]
    by_type = {d["type"]: d for d in data}
    assert {"chat", "customer_service", "sleepy"} <= set(by_type)
    assert "messages" in by_type["chat"]["input_schema"]["properties"]


def test_chat_completions_with_a_session_keeps_history(server: str) -> None:
    session = httpx.post(f"{server}/v1/sessions", json={"metadata": {"user": "ada"}}, headers=auth(KEY_A))
    assert session.status_code == 201
    sid = session.json()["id"]
    usages = []
    for text in ("My name is Ada.", "What is my name?"):
        r = httpx.post(f"{server}/v1/chat/completions", headers=auth(KEY_A), json={
            "model": "kimi-vl", "messages": [{"role": "user", "content": text}], "max_tokens": 4,
            "session_id": sid})
        assert r.status_code == 200, r.text
        assert r.json()["session_id"] == sid
        usages.append(r.json()["usage"])
    # the second call saw the first turn: its prompt is longer than the first's by that whole turn
    assert usages[1]["prompt_tokens"] > usages[0]["prompt_tokens"] + usages[0]["completion_tokens"]
    messages = httpx.get(f"{server}/v1/sessions/{sid}/messages", headers=auth(KEY_A)).json()["data"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "My name is Ada."
    info = httpx.get(f"{server}/v1/sessions/{sid}", headers=auth(KEY_A)).json()
    assert info["message_count"] == 4 and info["metadata"] == {"user": "ada"}
    assert info["token_count"] == usages[1]["prompt_tokens"] + usages[1]["completion_tokens"]
    # streaming turn also lands in the session
    with httpx.stream("POST", f"{server}/v1/chat/completions", headers=auth(KEY_A), json={
            "model": "kimi-vl", "messages": [{"role": "user", "content": "And again?"}], "max_tokens": 3,
            "stream": True, "session_id": sid}) as r:
        assert r.status_code == 200
        r.read()
    assert httpx.get(f"{server}/v1/sessions/{sid}", headers=auth(KEY_A)).json()["message_count"] == 6
    # unknown / foreign session ids
    r = httpx.post(f"{server}/v1/chat/completions", headers=auth(KEY_B), json={
        "model": "kimi-vl", "messages": [{"role": "user", "content": "hi"}], "session_id": sid})
    assert r.status_code == 404 and r.json()["error"]["param"] == "session_id"
    assert httpx.delete(f"{server}/v1/sessions/{sid}", headers=auth(KEY_A)).status_code == 204
    assert httpx.get(f"{server}/v1/sessions/{sid}", headers=auth(KEY_A)).status_code == 404
