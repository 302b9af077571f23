"""``LocalRuntime``: the whole platform in this process - embedded stores, the engine, a TaskRunner loop - with
the same methods as ``kimiray.Client``. For scripts, notebooks and tests; no Ray, no server, no set-up.

    from kimiray import LocalRuntime
    with LocalRuntime() as rt:                      # tiny checkpoint unless model="path or HF id"
        task = rt.submit("chat", {"messages": [{"role": "user", "content": "hi"}]})
        print(rt.wait(task.id).result)

State lives under ``$KIMIRAY_HOME/stores`` (or ``stores_url``: another SQLite dir or Redis), so tasks a crashed
script accepted are run by the next ``LocalRuntime`` on the same store.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from connectors.limits import Limits
from kimiray.errors import InvalidRequestError, KimirayError, NotFoundError, TaskCancelledError, TaskFailedError
from kimiray.errors import WaitTimeoutError
from kimiray.types import ChatResult, Session, SessionMessage, Task, TaskEvent, TaskPage

TERMINAL = ("succeeded", "failed", "cancelled")


class LocalRuntime:
    def __init__(
        self, model: str | None = None, *, stores_url: str | None = None, agent_modules: tuple[str, ...] = (),
        concurrency: int = 2, lease_s: float = 30.0, device: str | None = None, dtype: str | None = None,
        engine_options: dict[str, Any] | None = None, model_client: Any = None, owner: str = "local",
        run_tasks: bool = True, limits: Limits | None = None,
    ) -> None:
        """``model_client``: any ``connectors.model_client.ModelClient`` instead of loading a checkpoint (tests,
        or a remote model). ``run_tasks=False`` only submits (another process runs them). ``limits``: the input
        limits tasks follow (URL rules, media sizes), as ``limits`` in ray_config.yaml does for the service."""
        self.owner = owner
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kimiray-local", daemon=True)
        self._thread.start()
        self._stop: asyncio.Event | None = None
        self._runner_task: asyncio.Future | None = None
        self.engine = None
        try:
            self._call(self._open(model, stores_url, agent_modules, concurrency, lease_s, device, dtype,
                                  engine_options or {}, model_client, run_tasks, limits or Limits()))
        except BaseException:
            self._stop_loop()
            raise

    # ------------------------------------------------------------------ plumbing
    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        future: Future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    async def _open(self, model, stores_url, agent_modules, concurrency, lease_s, device, dtype, engine_options,
                    model_client, run_tasks, limits) -> None:
        from agents.runner import RunnerOptions, TaskRunner
        from connectors.model_client import BackendModelClient
        from serve_app.config import TasksConfig
        from serve_app.task_service import TaskService

        config = TasksConfig(stores_url=stores_url, agent_modules=list(agent_modules), lease_s=lease_s,
                             runner_concurrency=concurrency)
        self.service = TaskService(config)
        if model_client is None:
            from connectors.backend import LocalBackend

            await asyncio.to_thread(self._load_engine, model, device, dtype, engine_options)
            model_client = BackendModelClient(LocalBackend(self.engine))
        self.model_client = model_client
        self.runner = TaskRunner(self.service.stores, self.service.registry, model_client,
                                 RunnerOptions(concurrency=concurrency, lease_s=lease_s, model_path=model,
                                               limits=limits))
        if run_tasks:
            self._stop = asyncio.Event()
            self._runner_task = asyncio.ensure_future(self.runner.run_forever(self._stop))

    def _load_engine(self, model, device, dtype, engine_options) -> None:
        import torch

        from engine.runtime.engine import AsyncEngine
        from connectors.paths import tiny_checkpoint_dir

        path = model or str(tiny_checkpoint_dir())
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.engine = AsyncEngine.from_pretrained(path, device=device, dtype=dtype, **engine_options)

    async def _aclose(self) -> None:
        if self._stop is not None:
            self._stop.set()
        if self._runner_task is not None:
            try:
                await asyncio.wait_for(self._runner_task, timeout=30)
            except Exception:  # noqa: BLE001
                pass
        if self.engine is not None:
            await self.engine.shutdown(drain=False)
        await self.service.close()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._aclose(), timeout=60)
        finally:
            self._stop_loop()

    def __enter__(self) -> "LocalRuntime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ tasks
    def submit(self, type: str, input: dict[str, Any] | None = None, *, options: dict[str, Any] | None = None,
               idempotency_key: str | None = None) -> Task:
        from connectors.stores.base import TaskSubmission
        from pydantic import ValidationError

        try:
            submission = TaskSubmission(type=type, input=input or {}, options=options or {},
                                        idempotency_key=idempotency_key)
        except ValidationError as exc:
            raise InvalidRequestError(str(exc), status=422, code="invalid_request") from None
        task, created = self._call(self._guard(self.service.submit(self.owner, submission)))
        return Task.model_validate({**task, "created": created})

    async def _guard(self, coro: Any) -> Any:
        """Service errors -> the SDK's exceptions, as the HTTP client would raise them."""
        from connectors.errors import ClientInputError

        try:
            return await coro
        except ClientInputError as exc:
            cls = NotFoundError if exc.status_code == 404 else InvalidRequestError
            raise cls(exc.message, status=exc.status_code, code=exc.code, param=exc.param) from None

    def get(self, task_id: str) -> Task:
        return Task.model_validate(self._call(self._guard(self.service.get(self.owner, task_id))))

    def list_tasks(self, status: str | None = None, type: str | None = None, limit: int = 50,
                   cursor: str | None = None) -> TaskPage:
        page = self._call(self.service.stores.tasks.list(self.owner, status=status, type=type, limit=limit,
                                                         cursor=cursor))
        return TaskPage(data=[Task.model_validate(t.public()) for t in page.tasks], next_cursor=page.next_cursor)

    def cancel(self, task_id: str) -> Task:
        record = self._call(self.service.stores.tasks.cancel(task_id, self.owner))
        if record is None:
            raise NotFoundError(f"task {task_id!r} not found", status=404, code="not_found")
        return Task.model_validate(record.public())

    def stream_events(self, task_id: str, *, after: int = 0) -> Iterator[TaskEvent]:
        """Events with id > ``after`` until the one that ends the task."""
        self.get(task_id)
        tasks = self.service.stores.tasks
        position = after
        while True:
            events = self._call(tasks.wait_events(task_id, position, timeout_s=1.0))
            if not events:
                record = self._call(tasks.get(task_id, None))
                if record is None or (record.status in TERMINAL and record.last_event_id <= position):
                    return
                continue
            for event in events:
                position = event.id
                yield TaskEvent.model_validate(event.model_dump())
                if event.type == "status" and event.data.get("status") in TERMINAL:
                    return

    def wait(self, task_id: str, timeout: float | None = None, *, raise_on_failure: bool = True) -> Task:
        deadline = None if timeout is None else time.monotonic() + timeout
        tasks = self.service.stores.tasks
        task = self.get(task_id)
        position = 0
        while task.status not in TERMINAL:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise WaitTimeoutError(task_id, timeout, task)
            position = max(position, task.last_event_id)
            self._call(tasks.wait_events(task_id, position, timeout_s=min(1.0, remaining or 1.0)))
            task = self.get(task_id)
        if raise_on_failure and task.status == "failed":
            raise TaskFailedError(task)
        if raise_on_failure and task.status == "cancelled":
            raise TaskCancelledError(task)
        return task

    # ------------------------------------------------------------------ files
    def upload_file(self, data: bytes | str | Path, content_type: str = "application/pdf") -> str:
        """Store a file for a task to use by reference (``{"blob": ref}``); returns the ref."""
        payload = Path(data).read_bytes() if isinstance(data, (str, Path)) else bytes(data)
        return self._call(self.service.stores.blobs.put(self.owner, payload, content_type)).ref

    def download_artifact(self, task_id: str, name: str, path: str | Path | None = None) -> bytes:
        """A file the task produced (``result["artifacts"][name]``), also written to ``path`` when given."""
        task = self.get(task_id)
        entry = ((task.result or {}).get("artifacts") or {}).get(name) if isinstance(task.result, dict) else None
        data = self._call(self.service.stores.blobs.get(self.owner, entry["ref"])) if entry else None
        if data is None:
            raise NotFoundError(f"task {task_id!r} has no artifact {name!r}", status=404, code="not_found")
        if path is not None:
            Path(path).write_bytes(data)
        return data

    # ------------------------------------------------------------------ sessions and chat
    def create_session(self, metadata: dict[str, Any] | None = None, ttl_s: float | None = None) -> Session:
        record = self._call(self.service.stores.sessions.create(
            self.owner, metadata=metadata or {}, ttl_s=ttl_s or self.service.config.session_ttl_s))
        return Session.model_validate(record.public())

    def get_session(self, session_id: str) -> Session:
        record = self._call(self.service.stores.sessions.get(session_id, self.owner))
        if record is None:
            raise NotFoundError(f"session {session_id!r} not found", status=404, code="not_found")
        return Session.model_validate(record.public())

    def session_messages(self, session_id: str, start: int = 0, end: int | None = None) -> list[SessionMessage]:
        self.get_session(session_id)
        stored = self._call(self.service.stores.sessions.messages(session_id, self.owner, start=start, end=end))
        return [SessionMessage.model_validate(m.model_dump(mode="json")) for m in stored]

    def chat(self, messages: list[dict[str, Any]] | str, *, session_id: str | None = None, max_tokens: int = 256,
             temperature: float = 0.0, json_schema: dict[str, Any] | None = None, **extra: Any) -> ChatResult:
        """One model turn in-process. Messages are engine-format (local paths, bytes and PIL images allowed:
        this process trusts its caller); with ``session_id`` the turn continues and extends that session."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self._call(self._chat(list(messages), session_id, max_tokens, temperature, json_schema, extra))

    async def _chat(self, messages, session_id, max_tokens, temperature, json_schema, extra) -> ChatResult:
        from engine.runtime.request import GenerateRequest
        from serve_app.tasks_api import remember_turn, session_history

        history = await self._guard(session_history(self.service, self.owner, session_id)) if session_id else []
        request = GenerateRequest(messages=history + messages, max_tokens=max_tokens, temperature=temperature,
                                  json_schema=json_schema, session_id=session_id, **extra)
        reply = await self.model_client.generate(request)
        if session_id:
            await remember_turn(self.service, self.owner, session_id, messages, reply.text, reply.usage)
        return ChatResult(text=reply.text, reasoning=reply.reasoning or None, finish_reason=reply.finish_reason,
                          usage=reply.usage.model_dump() if reply.usage else {}, session_id=session_id)


__all__ = ["LocalRuntime", "KimirayError"]
