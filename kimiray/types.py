"""What the kimiray REST API returns, as pydantic models.

Every model keeps fields the server adds later (``extra="allow"``), so an older SDK reads a newer server.
Timestamps are kept as the server sends them (unix seconds or ISO strings); :func:`format_ts` shows either.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TaskStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

Timestamp = float | str | None


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Progress(_Model):
    """How far a task is: ``done`` of ``total`` units (either may be unknown) and a human line."""

    done: int | float | None = None
    total: int | float | None = None
    message: str | None = None

    @property
    def fraction(self) -> float | None:
        """``done / total`` clamped to [0, 1]; None when the total is unknown."""
        if self.done is None or not self.total:
            return None
        return min(1.0, max(0.0, float(self.done) / float(self.total)))


class TaskErrorInfo(_Model):
    """Why a task failed: a short machine ``code`` and a human ``message``."""

    code: str | None = None
    message: str = ""


class Task(_Model):
    """One unit of agent work. ``created`` is set on the submit answer only: False when the idempotency key
    had been seen before and this is the earlier task."""

    id: str
    type: str = ""
    status: str = "queued"
    input: Any = None
    options: dict[str, Any] | None = None
    idempotency_key: str | None = None
    session_id: str | None = None
    created_at: Timestamp = None
    updated_at: Timestamp = None
    started_at: Timestamp = None
    finished_at: Timestamp = None
    attempts: int = 0
    max_attempts: int | None = None
    progress: Progress | None = None
    result: Any = None
    error: TaskErrorInfo | None = None
    cancel_requested: bool = False
    expires_at: Timestamp = None
    last_event_id: int = 0
    created: bool | None = None

    @property
    def done(self) -> bool:
        """True once the task is succeeded, failed or cancelled: nothing about it changes after that."""
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


class TaskEvent(_Model):
    """One entry of a task's event log; ``id`` counts 1, 2, 3... per task, with no gaps."""

    id: int
    task_id: str = ""
    type: str
    data: dict[str, Any] = Field(default_factory=dict)
    ts: Timestamp = None

    @property
    def status(self) -> str | None:
        """The new status of a ``status`` event, else None."""
        return self.data.get("status") if self.type == "status" else None

    @property
    def is_terminal(self) -> bool:
        """The event after which the server closes the stream: the task reached a final status."""
        return self.status in TERMINAL_STATUSES

    @property
    def progress(self) -> Progress | None:
        """The progress a ``progress`` event carries, else None."""
        return Progress.model_validate(self.data) if self.type == "progress" else None


class TaskPage(_Model):
    """One page of ``GET /v1/tasks``; pass ``next_cursor`` back for the next (None on the last page)."""

    object: str = "list"
    data: list[Task] = Field(default_factory=list)
    next_cursor: str | None = None


class Session(_Model):
    """A stored conversation that chat requests with ``session_id`` read from and append to."""

    id: str
    parent_id: str | None = None
    created_at: Timestamp = None
    updated_at: Timestamp = None
    expires_at: Timestamp = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    token_count: int = 0
    message_count: int = 0


class SessionMessage(_Model):
    index: int
    role: str
    content: Any = None
    token_count: int | None = None
    ts: Timestamp = None


class ChatResult(_Model):
    """A chat completion reduced to what callers use; ``raw`` keeps the full OpenAI object (or, for a
    stream, the last chunk)."""

    text: str = ""
    reasoning: str | None = None
    finish_reason: str | None = None
    usage: dict[str, Any] = Field(default_factory=dict)
    session_id: str | None = None
    id: str | None = None
    model: str | None = None
    raw: dict[str, Any] = Field(default_factory=dict)

    def parsed(self) -> Any:
        """``text`` decoded as JSON: the answer to a ``json_schema`` request."""
        return json.loads(self.text)

    def __str__(self) -> str:
        return self.text


def format_ts(value: Timestamp) -> str:
    """A timestamp for people: unix seconds -> local ``YYYY-MM-DD HH:MM:SS``; strings as they are."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return _dt.datetime.fromtimestamp(float(value)).strftime("%Y-%m-%d %H:%M:%S")
    return str(value).replace("T", " ")[:19]
