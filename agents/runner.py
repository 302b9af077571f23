"""TaskRunner: lease tasks from the TaskStore, run their agents, write each result exactly once.

One loop per runner process (a TaskRunner Serve replica, ``kimiray worker``, or ``LocalRuntime``):

    lease -> build AgentContext (task session created or reused) -> agent.run(ctx, input)
          -> finish(succeeded | failed | cancelled)            (fenced by the lease token)

A heartbeat renews the lease every ``lease_s / 3``; it also learns of cancellation requests (honoured at the
agent's next step) and of a lost lease (another runner took the task after we stalled: our attempt is abandoned
and writes nothing). A runner that dies simply stops renewing; the store hands the task to another runner after
the lease expires, up to the task's ``max_attempts``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import traceback
import uuid
from typing import Any

from pydantic import BaseModel, Field

from agents.base import Agent, AgentContext, AgentError, TaskCancelled
from agents.registry import AgentRegistry, UnknownTaskType
from connectors.limits import Limits
from connectors.model_client import ContextTooLongError, ModelClient, ModelError, ModelUnavailableError
from connectors.stores.base import Lease, Progress, TaskError, TaskRecord
from pipelines.map_reduce import MapReduceCancelled

log = logging.getLogger("kimiray.runner")


class RunnerOptions(BaseModel):
    concurrency: int = Field(2, ge=1, le=256, description="tasks run at once by this runner")
    lease_s: float = Field(30.0, gt=0.5, description="a runner silent for this long loses its tasks")
    poll_s: float = Field(0.2, gt=0, description="idle wait between empty lease attempts (grows to 1 s)")
    session_ttl_s: float | None = Field(7 * 24 * 3600.0, description="TTL of task sessions (renewed on write)")
    retry_delay_s: float = Field(1.0, ge=0, description="pause before re-queueing a task whose model was down")
    model_path: str | None = Field(None, description="the served checkpoint (tokenizer for planning); None: tiny")
    purge_every_s: float = Field(600.0, gt=0, description="how often ended tasks past retention are deleted")
    limits: Limits = Field(default_factory=Limits, description="the service's input limits (ray_config.yaml "
                           "``limits``), handed to every agent as ``ctx.limits``")


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def task_session_id(task_id: str) -> str:
    """The session a task writes to when it did not name one: deterministic, so a re-run reuses it."""
    return f"sess_{task_id.removeprefix('task_')}"


class _Attempt:
    """Per-attempt flags the heartbeat sets and the agent context reads."""

    def __init__(self) -> None:
        self.cancel_requested = False
        self.lost = False


class TaskRunner:
    def __init__(
        self, stores: Any, registry: AgentRegistry, model: ModelClient, options: RunnerOptions | None = None,
        *, worker_id: str | None = None,
    ) -> None:
        self.stores = stores
        self.registry = registry
        self.model = model
        self.options = options or RunnerOptions()
        self.worker_id = worker_id or _worker_id()
        from agents.resources import ModelResources

        self.resources = ModelResources(self.options.model_path)
        self._running: dict[str, asyncio.Task] = {}
        self._leases: dict[str, Lease] = {}
        self.completed = 0
        self.failed = 0
        self.started_at = time.time()
        self._woken = asyncio.Event()

    def wake(self) -> None:
        """A task was just submitted: lease now instead of after the idle wait (which grows to 1 s). The service
        calls it on one runner replica per submission; the others keep polling."""
        self._woken.set()

    # ------------------------------------------------------------------ loop
    async def run_forever(self, stop: asyncio.Event) -> None:
        """Lease and run tasks until ``stop`` is set; then hand unfinished tasks back to the queue."""
        idle = self.options.poll_s
        types = self.registry.types()
        next_purge = time.monotonic() + self.options.purge_every_s * 0.1
        try:
            while not stop.is_set():
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + self.options.purge_every_s
                    await self.purge()
                if len(self._running) >= self.options.concurrency:
                    await asyncio.wait(list(self._running.values()), timeout=1.0,
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    lease = await self.stores.tasks.lease(self.worker_id, lease_s=self.options.lease_s, types=types)
                except Exception as exc:  # store down (Redis restarting): keep trying, accepted tasks wait
                    log.warning("lease failed (%s); retrying", exc)
                    lease = None
                    idle = min(idle * 2, 2.0)
                if lease is None:
                    if await self._idle(stop, idle):
                        idle = self.options.poll_s  # woken by a submission: ask again at once, then poll fast
                        continue
                    idle = min(idle * 1.5, 1.0)
                    continue
                idle = self.options.poll_s
                self._start(lease)
        finally:
            await self.shutdown()

    async def _idle(self, stop: asyncio.Event, seconds: float) -> bool:
        """Wait ``seconds``, or until ``stop`` or :meth:`wake`; True when woken."""
        if not self._woken.is_set():
            waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._woken.wait())}
            _done, pending = await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()
        woken = self._woken.is_set()
        self._woken.clear()
        return woken

    def _start(self, lease: Lease) -> asyncio.Task:
        task = asyncio.create_task(self.execute(lease), name=f"task:{lease.task.id}")
        self._running[lease.task.id] = task
        self._leases[lease.task.id] = lease
        task.add_done_callback(lambda _t, tid=lease.task.id: (self._running.pop(tid, None),
                                                              self._leases.pop(tid, None)))
        return task

    async def run_once(self, timeout_s: float = 5.0) -> TaskRecord | None:
        """Lease one task (waiting up to ``timeout_s``) and run it to the end; for tests and scripts."""
        deadline = time.monotonic() + timeout_s
        while True:
            lease = await self.stores.tasks.lease(self.worker_id, lease_s=self.options.lease_s,
                                                  types=self.registry.types())
            if lease is not None:
                await self.execute(lease)
                return await self.stores.tasks.get(lease.task.id, None)
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(self.options.poll_s)

    async def shutdown(self) -> None:
        """Graceful stop: cancel running attempts and release their tasks so another runner starts them now
        (not after the lease expires). The attempt is not counted against the task."""
        running = [(tid, task, self._leases.get(tid)) for tid, task in self._running.items()]
        for _tid, task, _lease in running:
            task.cancel()
        for tid, task, lease in running:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
            if lease is not None and task.cancelled():
                try:
                    await self.stores.tasks.release(lease)
                except Exception as exc:
                    log.warning("could not release %s (%s); it returns after its lease expires", tid, exc)

    async def purge(self) -> int:
        """Delete ended tasks past their retention (and expired sessions where the store needs it); any runner
        may do it, the stores make it safe to run concurrently."""
        removed = 0
        try:
            removed = await self.stores.tasks.purge_expired()
            purge_sessions = getattr(self.stores.sessions, "purge_expired", None)
            if purge_sessions is not None:
                removed += await purge_sessions()
        except Exception as exc:  # never let housekeeping stop the runner
            log.warning("purge failed: %s", exc)
        return removed

    def stats(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "running": len(self._running), "completed": self.completed,
                "failed": self.failed, "concurrency": self.options.concurrency,
                "types": self.registry.types(), "uptime_s": time.time() - self.started_at}

    # ------------------------------------------------------------------ one attempt
    async def execute(self, lease: Lease) -> None:
        task = lease.task
        attempt = _Attempt()
        if task.cancel_requested:
            await self._finish(lease, attempt, "cancelled")
            return
        heartbeat = asyncio.create_task(self._heartbeat(lease, attempt, asyncio.current_task()))
        try:
            await self._run_agent(lease, attempt)
        except asyncio.CancelledError:
            if attempt.lost:
                log.warning("task %s: lease lost; this attempt stops without writing", task.id)
                return
            raise  # shutdown: shutdown() releases the task
        finally:
            heartbeat.cancel()

    async def _run_agent(self, lease: Lease, attempt: _Attempt) -> None:
        task = lease.task
        tasks = self.stores.tasks
        try:
            agent_cls = self.registry.get(task.type)
        except UnknownTaskType as exc:
            await self._finish(lease, attempt, "failed", error=TaskError(code="unknown_task_type", message=str(exc)))
            return
        try:
            session_id = await self._prepare_session(lease)
            agent_input = agent_cls.validate_input(task.input)
        except AgentError as exc:
            await self._finish(lease, attempt, "failed", error=TaskError(code=exc.code, message=exc.message))
            return
        except Exception as exc:  # input validated at submission; this is a bug or a changed agent
            await self._finish(lease, attempt, "failed",
                               error=TaskError(code="invalid_input", message=str(exc)[:2000]))
            return

        async def emit(type_: str, data: dict[str, Any]) -> None:
            if attempt.lost:
                raise asyncio.CancelledError()
            if type_ == "progress":
                await tasks.set_progress(lease, Progress.model_validate(data))
            else:
                await tasks.append_event(task.id, type_, data)

        ctx = AgentContext(
            task_id=task.id, owner=task.owner, session_id=session_id, options=task.options,
            attempt=task.attempts, model=self.model, sessions=self.stores.sessions, blobs=self.stores.blobs,
            emit=emit, cancelled=lambda: attempt.cancel_requested, resources=self.resources,
            limits=self.options.limits,
        )
        agent: Agent = agent_cls()
        try:
            result = await agent.run(ctx, agent_input)
            payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
            await self._finish(lease, attempt, "succeeded", result=payload)
        except (TaskCancelled, MapReduceCancelled):  # at a step, or between chunks of a map-reduce
            await self._finish(lease, attempt, "cancelled")
        except AgentError as exc:
            await self._finish(lease, attempt, "failed", error=TaskError(code=exc.code, message=exc.message))
        except ModelUnavailableError as exc:
            # the model side is down or overloaded: give the task back (counted) and let it be retried
            log.warning("task %s: model unavailable (%s); re-queueing", task.id, exc)
            if task.attempts >= task.max_attempts:
                await self._finish(lease, attempt, "failed",
                                   error=TaskError(code="model_unavailable", message=str(exc)[:2000]))
            else:
                await asyncio.sleep(self.options.retry_delay_s)
                await tasks.release(lease, count_attempt=True)
        except ModelError as exc:
            code = "context_length_exceeded" if isinstance(exc, ContextTooLongError) else "model_error"
            await self._finish(lease, attempt, "failed", error=TaskError(code=code, message=str(exc)[:2000]))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("task %s (%s) failed:\n%s", task.id, task.type, traceback.format_exc())
            await self._finish(lease, attempt, "failed",
                               error=TaskError(code="internal_error", message=f"{type(exc).__name__}: {exc}"[:2000]))

    async def _prepare_session(self, lease: Lease) -> str:
        task = lease.task
        sessions = self.stores.sessions
        wanted = task.options.get("session_id") if isinstance(task.options, dict) else None
        if wanted:
            if await sessions.get(wanted, task.owner) is None:
                raise AgentError(f"session {wanted!r} not found", code="session_not_found")
            session_id = wanted
        else:
            session_id = task.session_id or task_session_id(task.id)
            await sessions.create(task.owner, session_id=session_id, ttl_s=self.options.session_ttl_s,
                                  metadata={"task_id": task.id, "task_type": task.type})
        if task.session_id != session_id:
            await self.stores.tasks.set_session(lease, session_id)
        return session_id

    async def _finish(self, lease: Lease, attempt: _Attempt, status: str, *, result: Any = None,
                      error: TaskError | None = None) -> None:
        if attempt.lost:
            return
        written = await self.stores.tasks.finish(lease, status, result=result, error=error)  # type: ignore[arg-type]
        if not written:
            log.warning("task %s: lease no longer current; result of this attempt dropped", lease.task.id)
            return
        if status == "succeeded":
            self.completed += 1
        elif status == "failed":
            self.failed += 1

    async def _heartbeat(self, lease: Lease, attempt: _Attempt, runner_task: asyncio.Task | None) -> None:
        period = max(0.2, self.options.lease_s / 3)
        failures = 0
        while True:
            await asyncio.sleep(period)
            try:
                state = await self.stores.tasks.renew(lease, self.options.lease_s)
                failures = 0
            except Exception as exc:  # store unreachable: keep trying until the lease would have expired
                failures += 1
                log.warning("task %s: heartbeat failed (%s)", lease.task.id, exc)
                if failures * period < self.options.lease_s:
                    continue
                state = "lost"
            if state == "cancel_requested":
                attempt.cancel_requested = True
            elif state == "lost":
                attempt.lost = True
                if runner_task is not None:
                    runner_task.cancel()
                return
