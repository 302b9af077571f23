"""Agent SDK, registry and TaskRunner on the embedded store, with a scripted model (no weights needed)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agents import Agent, AgentRegistry
from agents.registry import InvalidTaskInput, UnknownTaskType, build_registry
from agents.runner import RunnerOptions, TaskRunner, task_session_id
from connectors.model_client import ModelReply
from connectors.stores import open_stores
from connectors.stores.base import TaskSubmission
from engine.runtime.request import GenerateRequest
from tests.scripted_models import ScriptedModel


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture()
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'stores'}"


def registry_with_tests() -> AgentRegistry:
    return build_registry(["tests.agents_for_tests"])


async def _submit(stores, type_: str, input: dict, owner: str = "k1", **kw: Any):
    record, _ = await stores.tasks.submit(owner, TaskSubmission(type=type_, input=input, **kw))
    return record


def test_registry_knows_builtins_and_user_modules() -> None:
    registry = registry_with_tests()
    assert {"chat", "customer_service", "sleepy", "chunked_count"} <= set(registry.types())
    with pytest.raises(UnknownTaskType) as info:
        registry.get("os_agent_typo")
    assert "sleepy" in str(info.value)
    with pytest.raises(InvalidTaskInput) as bad:
        registry.validate("sleepy", {"steps": 0})
    assert bad.value.param == "input.steps"
    with pytest.raises(InvalidTaskInput):
        registry.validate("chat", {"messages": [{"role": "wizard", "content": "x"}]})
    schemas = {d["type"]: d["input_schema"] for d in registry.describe()}
    assert "message" in schemas["customer_service"]["properties"]


def test_registering_a_second_agent_under_a_taken_type_is_refused() -> None:
    registry = AgentRegistry()

    class A(Agent):
        type = "dup"

        async def run(self, ctx, input):
            return 1

    class B(Agent):
        type = "dup"

        async def run(self, ctx, input):
            return 2

    registry.register(A)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(B)


def test_runner_runs_a_task_with_progress_and_session(store_url: str) -> None:
    async def main() -> None:
        stores = open_stores(store_url)
        runner = TaskRunner(stores, registry_with_tests(), ScriptedModel(), RunnerOptions(lease_s=5))
        task = await _submit(stores, "sleepy", {"steps": 3, "step_s": 0.01, "tag": "a"})
        done = await runner.run_once()
        assert done is not None and done.id == task.id
        assert done.status == "succeeded" and done.result == {"tag": "a", "steps": 3, "attempt": 1}
        assert done.session_id == task_session_id(task.id)
        assert done.progress is not None and done.progress.done == 3 and done.progress.total == 3
        events = await stores.tasks.events(task.id)
        kinds = [(e.type, e.data.get("status")) for e in events]
        assert kinds[0] == ("status", "queued") and kinds[1] == ("status", "running")
        assert kinds[-1] == ("status", "succeeded")
        assert sum(1 for k, _ in kinds if k == "progress") == 3 and sum(1 for k, _ in kinds if k == "step") == 3
        assert [e.id for e in events] == list(range(1, len(events) + 1))
        assert await stores.sessions.get(done.session_id, "k1") is not None
        await stores.close()

    run(main())


def test_agent_error_fails_the_task_with_its_code(store_url: str) -> None:
    async def main() -> None:
        stores = open_stores(store_url)
        runner = TaskRunner(stores, registry_with_tests(), ScriptedModel())
        await _submit(stores, "sleepy", {"steps": 1, "step_s": 0, "fail_with": "document is encrypted"})
        done = await runner.run_once()
        assert done.status == "failed" and done.error.code == "requested_failure"
        assert done.error.message == "document is encrypted" and done.attempts == 1
        await stores.close()

    run(main())


def test_unexpected_exception_is_a_failed_task_not_a_dead_runner(store_url: str) -> None:
    class Boom(Agent):
        type = "boom"

        async def run(self, ctx, input):
            raise ZeroDivisionError("bad math")

    async def main() -> None:
        stores = open_stores(store_url)
        registry = AgentRegistry()
        registry.register(Boom)
        runner = TaskRunner(stores, registry, ScriptedModel())
        await _submit(stores, "boom", {})
        done = await runner.run_once()
        assert done.status == "failed" and done.error.code == "internal_error" and "bad math" in done.error.message
        await stores.close()

    run(main())


def test_cancellation_is_honoured_at_the_next_step(store_url: str) -> None:
    async def main() -> None:
        stores = open_stores(store_url)
        runner = TaskRunner(stores, registry_with_tests(), ScriptedModel(), RunnerOptions(lease_s=1.0))
        task = await _submit(stores, "sleepy", {"steps": 100, "step_s": 0.05})
        stop = asyncio.Event()
        loop = asyncio.create_task(runner.run_forever(stop))
        for _ in range(100):
            record = await stores.tasks.get(task.id, "k1")
            if record.progress is not None and record.progress.done >= 2:
                break
            await asyncio.sleep(0.05)
        await stores.tasks.cancel(task.id, "k1")
        for _ in range(100):
            record = await stores.tasks.get(task.id, "k1")
            if record.status == "cancelled":
                break
            await asyncio.sleep(0.05)
        assert record.status == "cancelled"
        assert record.progress.done < 100  # stopped early: the heartbeat (lease_s/3) saw the request
        stop.set()
        await loop
        await stores.close()

    run(main())


def test_a_runner_that_lost_its_lease_writes_nothing(store_url: str) -> None:
    async def main() -> None:
        stores = open_stores(store_url)
        task = await _submit(stores, "sleepy", {"steps": 1})
        stale = await stores.tasks.lease("dead-runner", lease_s=0.6)
        await asyncio.sleep(0.8)  # the first runner went silent; its lease expired
        runner = TaskRunner(stores, registry_with_tests(), ScriptedModel(), RunnerOptions(lease_s=5))
        done = await runner.run_once()
        assert done.status == "succeeded" and done.attempts == 2
        assert not await stores.tasks.finish(stale, "succeeded", result={"stale": True})
        final = await stores.tasks.get(task.id, "k1")
        assert final.result["attempt"] == 2
        ends = [e for e in await stores.tasks.events(task.id) if e.data.get("status") == "succeeded"]
        assert len(ends) == 1
        await stores.close()

    run(main())


def test_graceful_shutdown_hands_running_tasks_back(store_url: str) -> None:
    async def main() -> None:
        stores = open_stores(store_url)
        runner = TaskRunner(stores, registry_with_tests(), ScriptedModel(), RunnerOptions(lease_s=30))
        task = await _submit(stores, "sleepy", {"steps": 50, "step_s": 0.05})
        stop = asyncio.Event()
        loop = asyncio.create_task(runner.run_forever(stop))
        for _ in range(100):
            if (await stores.tasks.get(task.id, "k1")).status == "running":
                break
            await asyncio.sleep(0.02)
        stop.set()
        await loop
        record = await stores.tasks.get(task.id, "k1")
        assert record.status == "queued" and record.attempts == 0  # not counted against the task
        second = TaskRunner(stores, registry_with_tests(), ScriptedModel(), RunnerOptions(lease_s=30))
        again = await stores.tasks.lease(second.worker_id, lease_s=30)
        assert again is not None and again.task.id == task.id  # at once, not after 30 s
        await stores.close()

    run(main())


def test_model_unavailable_requeues_then_succeeds(store_url: str) -> None:
    async def main() -> None:
        stores = open_stores(store_url)
        model = ScriptedModel(["hello there"], fail_times=1)
        runner = TaskRunner(stores, registry_with_tests(), model, RunnerOptions(lease_s=5, retry_delay_s=0))
        await _submit(stores, "chat", {"messages": [{"role": "user", "content": "hi"}]})
        first = await runner.run_once()
        assert first.status == "queued" and first.attempts == 1
        second = await runner.run_once()
        assert second.status == "succeeded" and second.result["text"] == "hello there"
        assert second.attempts == 2
        await stores.close()

    run(main())


def test_chat_tasks_continue_a_session(store_url: str) -> None:
    async def main() -> None:
        stores = open_stores(store_url)
        model = ScriptedModel(["first answer", "second answer"])
        runner = TaskRunner(stores, registry_with_tests(), model)
        await _submit(stores, "chat", {"messages": [{"role": "user", "content": "one"}]})
        first = await runner.run_once()
        sid = first.result["session_id"]
        await _submit(stores, "chat", {"messages": [{"role": "user", "content": "two"}]},
                      options={"session_id": sid})
        second = await runner.run_once()
        assert second.status == "succeeded" and second.session_id == sid
        sent = model.requests[1].messages
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert sent[1]["content"] == "first answer"
        assert model.requests[1].session_id == sid  # model calls carry the session (replica affinity)
        stored = await stores.sessions.messages(sid, "k1")
        assert [m.content if isinstance(m.content, str) else m.content for m in stored][-1] == "second answer"
        session = await stores.sessions.get(sid, "k1")
        assert session.message_count == 4 and session.token_count == model.requests.__len__() * 10 + 3
        await stores.close()

    run(main())


def test_customer_service_example_agent_keeps_memory_and_images(store_url: str, tmp_path: Path) -> None:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((400, 300), 60).convert("RGB").save(buf, format="PNG")  # noise: > 64 KiB as PNG
    shot = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert len(buf.getvalue()) > 64 * 1024

    async def main() -> None:
        stores = open_stores(store_url)
        replies = [json.dumps({"reply": "Checking your invoice", "intent": "billing", "escalate": False}),
                   json.dumps({"reply": "Refund over 100 EUR, a colleague will call", "intent": "billing",
                               "escalate": True})]
        model = ScriptedModel(replies)
        runner = TaskRunner(stores, registry_with_tests(), model)
        await _submit(stores, "customer_service", {"message": "Wrong VAT number", "images": [shot]})
        first = await runner.run_once()
        assert first.status == "succeeded", first.error
        assert first.result["reply"]["intent"] == "billing" and first.result["turn"] == 1
        sid = first.result["session_id"]
        assert model.requests[0].json_schema is not None  # guided output
        await _submit(stores, "customer_service", {"message": "I want a 250 EUR refund"},
                      options={"session_id": sid})
        second = await runner.run_once()
        assert second.result["turn"] == 2 and second.result["escalate"] is True
        assert len(second.result["summary"]) == 2
        # the screenshot went to the blob store, and came back as an image for the second turn
        stored = await stores.sessions.messages(sid, "k1")
        user_parts = stored[1].content
        assert any(p.get("type") == "blob_ref" for p in user_parts)
        second_prompt = model.requests[1].messages
        images = [p for m in second_prompt if isinstance(m["content"], list) for p in m["content"]
                  if p.get("type") == "image"]
        assert len(images) == 1 and Image.open(io.BytesIO(images[0]["image"])).size == (400, 300)
        events = await stores.tasks.events(second.id)
        assert any(e.type == "escalation" for e in events)
        await stores.close()

    run(main())


def test_chat_leaves_out_the_oldest_turns_when_the_window_is_full(store_url: str) -> None:
    from connectors.model_client import ContextTooLongError

    class WindowedModel(ScriptedModel):
        """Refuses prompts with more than 4 messages, like an engine whose window is full."""

        async def generate(self, request: GenerateRequest) -> ModelReply:
            if len(request.messages) > 4:
                self.requests.append(request)
                raise ContextTooLongError("prompt + max_tokens over the window")
            return await super().generate(request)

    async def main() -> None:
        stores = open_stores(store_url)
        model = WindowedModel([f"answer {i}" for i in range(5)])
        runner = TaskRunner(stores, registry_with_tests(), model)
        sid = None
        for i in range(4):
            await _submit(stores, "chat", {"messages": [{"role": "user", "content": f"q{i}"}]},
                          options={"session_id": sid} if sid else {})
            done = await runner.run_once()
            assert done.status == "succeeded", done.error
            sid = done.result["session_id"]
        last = model.requests[-1].messages
        assert [m["content"] for m in last if m["role"] == "user"] == ["q2", "q3"]  # q0, q1 left out of the call
        assert (await stores.sessions.get(sid, "k1")).message_count == 8  # but kept in the session
        events = await stores.tasks.events(done.id)
        assert any(e.type == "history_truncated" for e in events)
        await stores.close()

    run(main())


def test_runner_purges_ended_tasks_past_retention(store_url: str) -> None:
    async def main() -> None:
        stores = open_stores(store_url)
        record, _ = await stores.tasks.submit("k1", TaskSubmission(type="sleepy", input={"steps": 1}),
                                              retention_s=0.2)
        runner = TaskRunner(stores, registry_with_tests(), ScriptedModel())
        assert (await runner.run_once()).status == "succeeded"
        assert await runner.purge() == 0  # still within retention
        await asyncio.sleep(0.3)
        assert await runner.purge() >= 1
        assert await stores.tasks.get(record.id, "k1") is None
        await stores.close()

    run(main())


def test_a_rerun_chat_turn_is_stored_once(store_url: str) -> None:
    """The runner can die after the model answered and the turn was stored but before the task finished; the
    re-run (same task id) returns the same reply without a second model call and without a second copy of the
    turn in the session, and a re-run that died before storing stores it once."""
    from agents.base import AgentContext
    from agents.chat import ChatAgent, ChatInput

    async def main() -> None:
        stores = open_stores(store_url)
        session = await stores.sessions.create("k1")
        model = ScriptedModel(["the answer", "a different answer"])

        async def emit(type_: str, data: dict) -> None:
            pass

        def context(task_id: str, attempt: int) -> AgentContext:
            return AgentContext(task_id=task_id, owner="k1", session_id=session.id, options={}, attempt=attempt,
                                model=model, sessions=stores.sessions, blobs=stores.blobs, emit=emit,
                                cancelled=lambda: False)

        turn = ChatInput(messages=[{"role": "user", "content": "hi"}])
        first = await ChatAgent().run(context("task_a", 1), turn)
        again = await ChatAgent().run(context("task_a", 2), turn)  # the re-run after a crash past the append
        assert again.text == first.text == "the answer" and len(model.requests) == 1
        stored = await stores.sessions.messages(session.id, "k1")
        assert [(m.role, m.content) for m in stored] == [("user", "hi"), ("assistant", "the answer")]
        # a crash between keeping the reply and storing the turn: the re-run stores it, once
        await stores.sessions.set_partial(session.id, "k1", "chat_turn.task_b", {
            "before": 2, "token_count": 0, "text": "kept reply", "reasoning": None, "finish_reason": "stop",
            "prompt_tokens": 1, "completion_tokens": 1})
        kept = await ChatAgent().run(context("task_b", 2), ChatInput(messages=[{"role": "user", "content": "more"}]))
        assert kept.text == "kept reply" and len(model.requests) == 1
        stored = await stores.sessions.messages(session.id, "k1")
        assert [m.content for m in stored] == ["hi", "the answer", "more", "kept reply"]
        await stores.close()

    run(main())


def test_a_woken_runner_starts_a_new_task_at_once_not_after_its_idle_wait(store_url: str) -> None:
    """The Ingress wakes a runner on each submission: the task must not wait for the idle poll (poll_s=5 here, so
    without the wake-up it would start ~5 s later)."""
    async def main() -> None:
        stores = open_stores(store_url)
        runner = TaskRunner(stores, registry_with_tests(), ScriptedModel(["done"]), RunnerOptions(poll_s=5.0))
        stop = asyncio.Event()
        loop = asyncio.create_task(runner.run_forever(stop))
        await asyncio.sleep(0.3)  # the queue was empty: the runner now waits up to 5 s
        task = await _submit(stores, "chat", {"messages": [{"role": "user", "content": "hi"}]})
        woken_at = asyncio.get_running_loop().time()
        runner.wake()
        while (await stores.tasks.get(task.id, "k1")).status == "queued":
            assert asyncio.get_running_loop().time() - woken_at < 2.0, "the wake-up did not start the task"
            await asyncio.sleep(0.02)
        stop.set()
        await loop
        await stores.close()

    run(main())


def test_the_service_wakes_a_runner_for_new_tasks_only(store_url: str) -> None:
    from serve_app.config import TasksConfig
    from serve_app.task_service import TaskService

    async def main() -> None:
        calls: list[int] = []

        def wake() -> None:
            calls.append(1)
            raise RuntimeError("no runner reachable")  # a failed wake-up must not fail the submission

        service = TaskService(TasksConfig(stores_url=store_url, agent_modules=["tests.agents_for_tests"]),
                              on_submitted=wake)
        submission = TaskSubmission(type="chat", input={"messages": [{"role": "user", "content": "hi"}]},
                                    idempotency_key="same-key")
        first, created = await service.submit("k1", submission)
        again, created_again = await service.submit("k1", submission)
        assert created and not created_again and first["id"] == again["id"]
        assert calls == [1]  # the repeat found the stored task: nothing new to start
        await service.close()

    run(main())
