"""The agent SDK: an ``Agent`` is a small class with typed input and a ``run(ctx, input)`` coroutine.

``AgentContext`` is everything a step needs and nothing else: the model (``ctx.chat`` / ``ctx.generate``), the
task's session (messages, partial results, child sessions), progress and custom events, and cancellation.
The runner builds the context; agents never touch stores, leases or transports directly, which is why the same
agent runs under ``LocalRuntime``, in a TaskRunner replica, and in unit tests with a scripted model.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from connectors.limits import Limits
from connectors.model_client import ModelClient, ModelReply
from connectors.stores.base import BlobStore, Progress, SessionStore
from engine.runtime.request import GenerateRequest

log = logging.getLogger("kimiray.agents")


class TaskCancelled(Exception):
    """Raised at a step boundary once the task's cancellation was requested; the runner ends it as cancelled."""


class AgentError(Exception):
    """A failure the user should see as the task's error (bad document, impossible request). Not retried."""

    def __init__(self, message: str, code: str = "agent_error") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InputRejected(ValueError):
    """Raised by :meth:`Agent.check_submission`: the input parsed but cannot work (a 422 naming ``param``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class SubmissionCheck:
    """What a submission check may look at besides the input: the caller's uploaded blobs (read-only)."""

    def __init__(self, owner: str, blobs: BlobStore) -> None:
        self.owner = owner
        self._blobs = blobs

    async def blob(self, ref: str) -> bytes | None:
        return await self._blobs.get(self.owner, ref)


class EmptyInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Agent(abc.ABC):
    """Subclass, set ``type`` and ``Input``, implement ``run``; register with ``@register_agent``.

    ``Input`` is validated when the task is submitted, so bad input is a 422 at ``POST /v1/tasks``, never a
    failed task later. ``run`` returns a pydantic model or a JSON-serialisable value: the task's result.
    ``run`` may be called again for the same task after a runner died mid-way: keep expensive results in
    ``ctx.save_partial`` and look them up first (``ctx.load_partial``), or use ``pipelines.map_reduce``.
    """

    type: ClassVar[str]
    Input: ClassVar[type[BaseModel]] = EmptyInput
    description: ClassVar[str] = ""
    # per-type defaults the runner applies
    max_attempts: ClassVar[int] = 3

    @abc.abstractmethod
    async def run(self, ctx: "AgentContext", input: Any) -> Any: ...

    @classmethod
    def validate_input(cls, data: dict[str, Any]) -> BaseModel:
        return cls.Input.model_validate(data)

    @classmethod
    async def check_submission(cls, input: Any, check: SubmissionCheck) -> None:
        """Checks at ``POST /v1/tasks`` that need more than the input itself (an uploaded blob's file type, the
        configured desktops): raise :class:`InputRejected` and the submission is a 422, nothing stored."""

    @classmethod
    def stored_input(cls, input: Any) -> dict[str, Any] | None:
        """What the task record keeps instead of the submitted input (None: the input as submitted), for data
        that must not be stored as sent (e.g. patient data in DICOM headers); the task then runs on this."""
        return None


class AgentContext:
    """One task attempt's view of the world. Created by the runner (or by tests with any stores/model)."""

    def __init__(
        self, *, task_id: str, owner: str, session_id: str, options: dict[str, Any], attempt: int,
        model: ModelClient, sessions: SessionStore, blobs: BlobStore, emit: Any, cancelled: Any,
        resources: Any = None, limits: Limits | None = None,
    ) -> None:
        self.task_id = task_id
        self.owner = owner
        self.session_id = session_id
        self.options = options
        self.attempt = attempt
        self.model = model
        self.sessions = sessions
        self.blobs = blobs
        self._emit = emit  # async (type, data) -> None
        self._cancelled = cancelled  # () -> bool
        self._resources = resources
        # the service's input limits (ray_config.yaml ``limits``): URL rules, media sizes for the task's inputs
        self.limits = limits if limits is not None else Limits()
        self.log = logging.LoggerAdapter(log, {"task_id": task_id})

    # ------------------------------------------------------------------ control
    @property
    def cancel_requested(self) -> bool:
        return bool(self._cancelled())

    def check_cancelled(self) -> None:
        """Call between steps: raises ``TaskCancelled`` once the user asked to cancel."""
        if self._cancelled():
            raise TaskCancelled(self.task_id)

    async def step(self, name: str, **data: Any) -> None:
        """Mark the start of a step: honours cancellation, then emits a ``step`` event."""
        self.check_cancelled()
        await self.emit("step", {"name": name, **data})

    # ------------------------------------------------------------------ events
    async def emit(self, type: str, data: dict[str, Any] | None = None) -> None:
        await self._emit(type, dict(data or {}))

    async def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        await self._emit("progress", Progress(done=done, total=total, message=message).model_dump())

    # ------------------------------------------------------------------ model
    async def generate(self, request: GenerateRequest | dict[str, Any]) -> ModelReply:
        """One model call; the session id is attached so the call prefers the replica holding its cache."""
        self.check_cancelled()
        req = request if isinstance(request, GenerateRequest) else GenerateRequest.model_validate(request)
        if req.session_id is None:
            req = req.model_copy(update={"session_id": self.session_id})
        return await self.model.generate(req)

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> ModelReply:
        return await self.generate({"messages": messages, **params})

    @property
    def resources(self) -> Any:
        """``agents.resources.ModelResources``: the served model's tokenizer (``.counter``) and window."""
        if self._resources is None:
            from agents.resources import ModelResources

            self._resources = ModelResources()
        return self._resources

    # ------------------------------------------------------------------ session
    async def history(self, *, resolve_media: bool = True) -> list[dict[str, Any]]:
        """The session's messages in the engine's chat format (media read back from the blob store)."""
        stored = await self.sessions.messages(self.session_id, self.owner, resolve_media=resolve_media)
        return [{"role": m.role, "content": m.content} for m in stored]

    async def remember(self, messages: list[dict[str, Any]], token_count: int = 0) -> None:
        await self.sessions.append(self.session_id, self.owner, messages, token_count=token_count)

    async def save_partial(self, key: str, value: Any) -> None:
        await self.sessions.set_partial(self.session_id, self.owner, key, value)

    async def load_partial(self, key: str, default: Any = None) -> Any:
        return (await self.sessions.partials(self.session_id, self.owner)).get(key, default)
