"""The task and session service behind the REST routes: stores + agent registry + settings.

Submission validates everything a runner would later trip over - the task type is registered, the input matches
the agent's schema, a named session exists for this key - so bad input is a 4xx now, never a failed task later.
Used by the routes (``serve_app.tasks_api``), the chat session hook and ``kimiray.LocalRuntime``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from agents.base import InputRejected, SubmissionCheck
from agents.registry import AgentRegistry, InvalidTaskInput, UnknownTaskType, build_registry
from connectors.errors import ClientInputError
from connectors.stores import open_stores, stores_url_from_env
from connectors.stores.base import TaskSubmission
from serve_app.config import TasksConfig


log = logging.getLogger("kimiray.tasks")


class NotFoundError(ClientInputError):
    default_status = 404
    default_code = "not_found"


# What ``options`` of ``POST /v1/tasks`` may hold (everything else the agent reads is an input field): an unknown
# key is a 422, never silently ignored.
TASK_OPTIONS = ("session_id",)


class TaskService:
    """Stores + agent registry + settings, shared by the task and session routes (and the chat session hook)."""

    def __init__(self, config: TasksConfig, stores: Any = None, registry: AgentRegistry | None = None,
                 on_submitted: Callable[[], None] | None = None) -> None:
        """``on_submitted``: told after each newly stored task (the Ingress wakes a runner replica with it, so a
        task starts at once instead of at the runners' next idle poll); it must not block and its errors are
        ignored (the runners' polling still finds the task)."""
        self.config = config
        self.on_submitted = on_submitted
        self.stores = stores or open_stores(config.stores_url or stores_url_from_env(),
                                            blob_threshold=config.blob_threshold,
                                            min_replica_acks=config.min_replica_acks,
                                            replica_ack_timeout_s=config.replica_ack_timeout_s)
        self.registry = registry or build_registry(config.agent_modules)

    async def close(self) -> None:
        await self.stores.close()

    # ------------------------------------------------------------------ tasks
    def validate(self, submission: TaskSubmission) -> Any:
        """The validated input model (a 4xx for anything the input's own schema refuses)."""
        try:
            validated = self.registry.validate(submission.type, submission.input)
        except UnknownTaskType as exc:
            raise ClientInputError(str(exc), status_code=422, code="unknown_task_type", param="type") from None
        except InvalidTaskInput as exc:
            raise ClientInputError(str(exc), status_code=422, code="invalid_input", param=exc.param) from None
        unknown = sorted(set(submission.options) - set(TASK_OPTIONS))
        if unknown:
            raise ClientInputError(f"unknown task option {unknown[0]!r}: options take only {', '.join(TASK_OPTIONS)}"
                                   f"; the agent's settings are input fields (GET /v1/task-types)", status_code=422,
                                   code="invalid_input", param=f"options.{unknown[0]}")
        size = len(json.dumps([submission.input, submission.options], default=str))
        if size > self.config.max_input_bytes:
            raise ClientInputError(f"task input + options are {size} bytes of JSON, over the limit of "
                                   f"{self.config.max_input_bytes}; put large files in a URL", status_code=413,
                                   code="input_too_large", param="input")
        return validated

    async def check(self, owner: str, submission: TaskSubmission, validated: Any) -> None:
        """The agent's own checks that look beyond the input (uploaded blobs, configured desktops)."""
        try:
            await self.registry.get(submission.type).check_submission(validated,
                                                                      SubmissionCheck(owner, self.stores.blobs))
        except InputRejected as exc:
            raise ClientInputError(exc.message, status_code=422, code="invalid_input",
                                   param=f"input.{exc.param}") from None

    async def submit(self, owner: str, submission: TaskSubmission) -> tuple[dict[str, Any], bool]:
        validated = self.validate(submission)
        await self.check(owner, submission, validated)
        session_id = submission.options.get("session_id")
        if session_id is not None:
            if not isinstance(session_id, str) or await self.stores.sessions.get(session_id, owner) is None:
                raise NotFoundError(f"session {session_id!r} not found", param="options.session_id")
        agent_cls = self.registry.get(submission.type)
        stored = agent_cls.stored_input(validated)
        if stored is not None:
            submission = submission.model_copy(update={"input": stored})
        record, created = await self.stores.tasks.submit(
            owner, submission, max_attempts=min(self.config.max_attempts, agent_cls.max_attempts),
            retention_s=self.config.retention_s)
        if created and self.on_submitted is not None:
            try:
                self.on_submitted()
            except Exception:  # noqa: BLE001 - a wake-up only saves the poll's wait; the task is stored
                log.debug("on_submitted failed", exc_info=True)
        return record.public(), created

    async def get(self, owner: str, task_id: str) -> dict[str, Any]:
        record = await self.stores.tasks.get(task_id, owner)
        if record is None:
            raise NotFoundError(f"task {task_id!r} not found", param="task_id")
        return record.public()
