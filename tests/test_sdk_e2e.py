"""The SDK and CLI against the real ingress app (tiny engine, embedded store), and LocalRuntime in-process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

import kimiray
from kimiray.errors import InvalidRequestError, NotFoundError, TaskCancelledError, TaskFailedError
from tests.task_server import task_server

KEY, OTHER = "sk-sdk-test-0001", "sk-sdk-test-0002"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    from engine.runtime.engine import AsyncEngine

    engine = AsyncEngine.from_pretrained(str(tiny_checkpoint), device="cpu", dtype=torch.float32)
    with task_server(f"sqlite:///{tmp_path_factory.mktemp('sdk-stores')}", f"{KEY},{OTHER}", engine=engine) as url:
        yield url


def test_client_submit_wait_events_and_errors(server: str) -> None:
    with kimiray.Client(server, api_key=KEY) as client:
        task = client.submit("chat", {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})
        assert task.created is True and task.status in ("queued", "running")
        done = client.wait(task.id, timeout=60)
        assert done.status == "succeeded" and done.result["completion_tokens"] >= 1
        events = list(client.stream_events(task.id))
        assert [e.id for e in events] == list(range(1, len(events) + 1))
        assert events[-1].type == "status" and events[-1].data["status"] == "succeeded"
        assert list(client.stream_events(task.id, after=events[-2].id)) == [events[-1]]

        again = client.submit("sleepy", {"steps": 1}, idempotency_key="same-key")
        replay = client.submit("sleepy", {"steps": 1}, idempotency_key="same-key")
        assert replay.id == again.id and replay.created is False

        with pytest.raises(InvalidRequestError) as bad:
            client.submit("no_such_agent", {})
        assert bad.value.status == 422 and bad.value.code == "unknown_task_type"
        failing = client.submit("sleepy", {"steps": 1, "fail_with": "nope"})
        with pytest.raises(TaskFailedError) as failed:
            client.wait(failing.id, timeout=30)
        assert failed.value.task.error.code == "requested_failure"
        slow = client.submit("sleepy", {"steps": 500, "step_s": 0.05})
        client.cancel(slow.id)
        with pytest.raises(TaskCancelledError):
            client.wait(slow.id, timeout=30)
        ids = {t.id for t in client.iter_tasks(type="sleepy")}
        assert {again.id, failing.id, slow.id} <= ids
    with kimiray.Client(server, api_key=OTHER) as other, pytest.raises(NotFoundError):
        other.get(task.id)


def test_client_chat_with_a_session_and_streaming(server: str) -> None:
    with kimiray.Client(server, api_key=KEY) as client:
        session = client.create_session(metadata={"case": 7})
        first = client.chat("Remember the number 7.", session_id=session.id, max_tokens=3)
        second = client.chat("Which number?", session_id=session.id, max_tokens=3)
        assert second.usage["prompt_tokens"] > first.usage["prompt_tokens"]
        messages = client.session_messages(session.id)
        assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
        stream = client.chat("Stream it", max_tokens=3, stream=True)
        pieces = list(stream)
        assert "".join(pieces) == stream.result.text and stream.result.finish_reason in ("stop", "length")


def test_async_client(server: str) -> None:
    async def main() -> None:
        async with kimiray.AsyncClient(server, api_key=KEY) as client:
            task = await client.submit("sleepy", {"steps": 3, "step_s": 0.01})
            seen = [e async for e in client.stream_events(task.id)]
            assert sum(e.type == "progress" for e in seen) == 3
            assert (await client.wait(task.id, timeout=30)).result["steps"] == 3

    asyncio.run(main())


def test_cli_submit_and_tasks_commands(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kimiray.cli import main

    out = tmp_path / "result.json"
    code = main(["submit", "sleepy", "--input-json", '{"steps": 2, "tag": "cli"}', "--url", server,
                 "--api-key", KEY, "--output", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["tag"] == "cli"
    capsys.readouterr()
    assert main(["tasks", "ls", "--type", "sleepy", "--url", server, "--api-key", KEY]) == 0
    listing = capsys.readouterr().out
    assert "sleepy" in listing and "succeeded" in listing
    code = main(["submit", "no_such_agent", "--input-json", "{}", "--url", server, "--api-key", KEY])
    assert code == 2 and "unknown task type" in capsys.readouterr().err


def test_local_runtime_runs_agents_in_process(tmp_path: Path, tiny_checkpoint: Path) -> None:
    url = f"sqlite:///{tmp_path / 'stores'}"
    # a script that only accepted tasks (and then crashed) leaves them in the store ...
    with kimiray.LocalRuntime(model=str(tiny_checkpoint), stores_url=url, run_tasks=False,
                              agent_modules=("tests.agents_for_tests",)) as accepting:
        pending = accepting.submit("sleepy", {"steps": 2, "tag": "left-behind"})
    # ... and the next runtime on the same store runs them
    with kimiray.LocalRuntime(model=str(tiny_checkpoint), stores_url=url,
                              agent_modules=("tests.agents_for_tests",)) as rt:
        assert rt.wait(pending.id, timeout=30).result["tag"] == "left-behind"
        task = rt.submit("chat", {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
        done = rt.wait(task.id, timeout=60)
        assert done.status == "succeeded" and done.result["completion_tokens"] >= 1
        events = list(rt.stream_events(task.id))
        assert events[-1].data["status"] == "succeeded"
        session = rt.create_session()
        rt.chat("first", session_id=session.id, max_tokens=2)
        reply = rt.chat("second", session_id=session.id, max_tokens=2)
        assert reply.session_id == session.id and rt.get_session(session.id).message_count == 4
        with pytest.raises(InvalidRequestError):
            rt.submit("sleepy", {"steps": "many"})
        with pytest.raises(NotFoundError):
            rt.get("task_missing")
