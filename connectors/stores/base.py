"""The task, session and blob store contracts that every implementation (Redis, embedded SQLite) follows.

Why a contract: the ingress, the TaskRunner replicas, the SDK's LocalRuntime and the agents only see these
interfaces, so one machine with no set-up (SQLite file + a directory) and a cluster (Redis) behave the same;
``tests/test_store_contract.py`` runs the same tests against both.

Ownership: every task, session and blob belongs to one owner (the API key's ``key_id``). Methods that take
``owner`` return ``None`` / raise ``NotFound`` for another owner's records exactly as for missing ones, so no key
can learn that another key's id exists. ``owner=None`` is reserved for trusted internal callers (runners).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

TaskStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
LeaseState = Literal["ok", "lost", "cancel_requested"]


class StoreError(Exception):
    """A store could not do what was asked (connection lost for good, corrupt record)."""


class NotFound(StoreError):
    """No such record for this owner (also raised for another owner's record)."""


class InvalidCursor(StoreError, ValueError):
    """A list cursor that this store did not hand out: the caller's mistake (a ValueError), not a store failure."""


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def now() -> float:
    return time.time()


# ----------------------------------------------------------------------------------------------------- tasks


class TaskSubmission(BaseModel):
    """What a client submits (``POST /v1/tasks``)."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    input: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)


class Progress(BaseModel):
    done: float = 0
    total: float | None = None
    message: str = ""


class TaskError(BaseModel):
    code: str
    message: str


class TaskRecord(BaseModel):
    """A task as stored. ``lease_*`` fields are internal; :meth:`public` drops them for clients."""

    id: str
    owner: str
    type: str
    status: TaskStatus = "queued"
    input: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = None
    session_id: str | None = None
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    max_attempts: int = 3
    progress: Progress | None = None
    result: Any = None
    error: TaskError | None = None
    cancel_requested: bool = False
    retention_s: float = 7 * 24 * 3600.0
    expires_at: float | None = None  # set when the task ends: finished_at + retention_s
    last_event_id: int = 0
    lease_worker: str | None = None
    lease_token: str | None = None
    lease_expires_at: float | None = None

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude={"owner", "lease_worker", "lease_token", "lease_expires_at", "retention_s"})


class TaskEvent(BaseModel):
    """One event of a task. ``id`` counts from 1 per task with no gaps (SSE ``id:``; resume with Last-Event-ID).

    Types the store itself writes: ``status`` (data: {status, attempt?, error?}); agents add ``progress``
    (data: Progress), ``log`` and their own types.
    """

    id: int
    task_id: str
    type: str
    data: dict[str, Any] = Field(default_factory=dict)
    ts: float


class Lease(BaseModel):
    """A runner's claim on a running task; every write by the runner presents it (fencing token)."""

    task: TaskRecord
    token: str
    worker_id: str
    expires_at: float


class TaskPage(BaseModel):
    tasks: list[TaskRecord]
    next_cursor: str | None = None


@runtime_checkable
class TaskStore(Protocol):
    """Durable task lifecycle: queued -> running -> succeeded | failed | cancelled.

    Invariants every implementation keeps:
      * ``submit`` with an (owner, idempotency_key) seen before returns the existing task and ``created=False``.
      * A queued task is leased by exactly one caller of ``lease``; a running task whose lease expired
        (runner died) is leased again (attempts + 1) or, after ``max_attempts`` attempts, failed with code
        ``lease_expired``.
      * ``finish`` succeeds only with the current lease token and only once: the result is written exactly once.
      * Status changes append a ``status`` event atomically with the change.
    """

    async def submit(
        self, owner: str, submission: TaskSubmission, *, max_attempts: int = 3, retention_s: float = 7 * 24 * 3600.0
    ) -> tuple[TaskRecord, bool]: ...

    async def get(self, task_id: str, owner: str | None) -> TaskRecord | None: ...

    async def list(
        self, owner: str, *, status: str | None = None, type: str | None = None, limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """Newest first; ``cursor`` is opaque (from the previous page's ``next_cursor``)."""
        ...

    async def cancel(self, task_id: str, owner: str | None) -> TaskRecord | None:
        """Queued -> cancelled at once; running -> ``cancel_requested`` (the runner ends it at the agent's next
        step); terminal -> unchanged. ``None`` if not found for this owner."""
        ...

    async def lease(self, worker_id: str, *, lease_s: float, types: list[str] | None = None) -> Lease | None:
        """Claim the oldest queued task (of ``types`` if given) or a running one whose lease expired."""
        ...

    async def renew(self, lease: Lease, lease_s: float) -> LeaseState:
        """Heartbeat. ``lost`` if the lease expired and someone else holds the task (or it ended)."""
        ...

    async def set_session(self, lease: Lease, session_id: str) -> bool: ...

    async def set_progress(self, lease: Lease, progress: Progress) -> bool:
        """Store the progress on the record and append a ``progress`` event."""
        ...

    async def append_event(self, task_id: str, type: str, data: dict[str, Any]) -> TaskEvent: ...

    async def events(self, task_id: str, after: int = 0, limit: int = 1000) -> list[TaskEvent]: ...

    async def wait_events(self, task_id: str, after: int, timeout_s: float, limit: int = 1000) -> list[TaskEvent]:
        """Events with id > ``after``; waits up to ``timeout_s`` for the first one (empty list on timeout)."""
        ...

    async def finish(
        self, lease: Lease, status: Literal["succeeded", "failed", "cancelled"], *, result: Any = None,
        error: TaskError | None = None,
    ) -> bool:
        """End the task exactly once; ``False`` (and nothing written) if the lease is no longer current."""
        ...

    async def release(self, lease: Lease, *, count_attempt: bool = False) -> bool:
        """Put a running task back in the queue now (graceful shutdown); the attempt is not counted unless
        asked."""
        ...

    async def purge_expired(self, at: float | None = None) -> int:
        """Delete ended tasks past their retention (with their events and idempotency keys)."""
        ...

    async def close(self) -> None: ...


# -------------------------------------------------------------------------------------------------- sessions


class SessionRecord(BaseModel):
    id: str
    owner: str
    parent_id: str | None = None
    created_at: float
    updated_at: float
    expires_at: float | None = None  # None: no TTL
    metadata: dict[str, Any] = Field(default_factory=dict)
    token_count: int = 0
    message_count: int = 0

    def public(self) -> dict[str, Any]:
        return self.model_dump(exclude={"owner"})


class SessionMessage(BaseModel):
    """One stored message. Media parts above the blob threshold are stored as
    ``{"type": "blob_ref", "ref": ..., "content_type": ..., "kind": "image"|"video"|"file", "size": N}``."""

    index: int
    role: str
    content: Any
    token_count: int = 0
    ts: float


@runtime_checkable
class SessionStore(Protocol):
    """Ordered messages, partial results, parent/child sessions and a TTL (renewed on each write).

    Large media (data URLs / bytes over ``blob_threshold``) in appended messages go to the blob store and are
    replaced by ``blob_ref`` parts (see :func:`connectors.stores.media.externalize`); read them back with
    ``resolve_media=True``.
    """

    async def create(
        self, owner: str, *, parent_id: str | None = None, metadata: dict[str, Any] | None = None,
        ttl_s: float | None = None, session_id: str | None = None,
    ) -> SessionRecord:
        """``session_id`` lets a caller choose the id (e.g. a deterministic child id for resumable chunked
        work); creating an existing id of the same owner returns it unchanged."""
        ...

    async def get(self, session_id: str, owner: str | None) -> SessionRecord | None: ...

    async def append(
        self, session_id: str, owner: str | None, messages: list[dict[str, Any]], *, token_count: int = 0
    ) -> SessionRecord:
        """Append in order; ``token_count`` is added to the session's total. Raises NotFound."""
        ...

    async def messages(
        self, session_id: str, owner: str | None, *, start: int = 0, end: int | None = None,
        resolve_media: bool = False,
    ) -> list[SessionMessage]: ...

    async def set_partial(self, session_id: str, owner: str | None, key: str, value: Any) -> None: ...

    async def partials(self, session_id: str, owner: str | None) -> dict[str, Any]: ...

    async def update_metadata(self, session_id: str, owner: str | None, metadata: dict[str, Any]) -> SessionRecord:
        """Shallow-merge into the session's metadata."""
        ...

    async def children(self, session_id: str, owner: str | None) -> list[SessionRecord]:
        """Child sessions in creation order."""
        ...

    async def delete(self, session_id: str, owner: str | None) -> bool:
        """Delete the session, its messages and partials (children too)."""
        ...

    async def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------------ blobs


class BlobRef(BaseModel):
    ref: str  # sha256 hex of the content
    size: int
    content_type: str = "application/octet-stream"


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed bytes per owner (screenshots, pages, frames, annotated PDFs)."""

    async def put(self, owner: str, data: bytes, content_type: str = "application/octet-stream") -> BlobRef: ...

    async def get(self, owner: str, ref: str) -> bytes | None: ...

    async def info(self, owner: str, ref: str) -> BlobRef | None: ...

    async def delete(self, owner: str, ref: str) -> bool: ...

    async def close(self) -> None: ...
