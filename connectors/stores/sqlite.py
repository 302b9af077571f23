"""Embedded stores: one SQLite file (``stores.db``) for tasks and sessions, blobs as files beside it.

Why SQLite: one machine with no set-up gets the same durable semantics as Redis. Ray Serve replicas are
separate processes sharing the file, so every read-modify-write runs in ``BEGIN IMMEDIATE`` (one writer at a
time across processes, others wait up to ``busy_timeout``), the journal is WAL (readers never block the writer)
and ``synchronous=FULL`` (a commit survives a power cut). Inside one process a store has one connection behind a
lock and runs its calls in worker threads (``asyncio.to_thread``) so the event loop never blocks on disk.

A task is stored as its full :class:`TaskRecord` JSON plus the columns the queries need (status, times,
owner, idempotency key); an event is a row keyed by (task id, event id).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from connectors.stores import media
from connectors.stores.base import (
    TERMINAL_STATUSES,
    BlobRef,
    BlobStore,
    InvalidCursor,
    Lease,
    LeaseState,
    NotFound,
    Progress,
    SessionMessage,
    SessionRecord,
    StoreError,
    TaskError,
    TaskEvent,
    TaskPage,
    TaskRecord,
    TaskSubmission,
    new_id,
    now,
)

__all__ = ["SqliteTaskStore", "SqliteSessionStore", "FileBlobStore", "DB_NAME"]

DB_NAME = "stores.db"
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    idempotency_key TEXT,
    lease_expires_at REAL,
    expires_at REAL,
    last_event_id INTEGER NOT NULL DEFAULT 0,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, created_at, id);
CREATE INDEX IF NOT EXISTS tasks_by_lease ON tasks (status, lease_expires_at);
CREATE INDEX IF NOT EXISTS tasks_by_owner ON tasks (owner, created_at, id);
CREATE INDEX IF NOT EXISTS tasks_by_expiry ON tasks (expires_at) WHERE expires_at IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS tasks_idempotency ON tasks (owner, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS task_events (
    task_id TEXT NOT NULL,
    id INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (task_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    parent_id TEXT,
    ttl_s REAL,
    expires_at REAL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_parent ON sessions (parent_id, seq);
CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS session_messages (
    session_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (session_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_partials (
    session_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (session_id, key)
) WITHOUT ROWID;
"""


class _Db:
    """One connection to ``stores.db`` used by one store object: calls run one at a time in worker threads,
    each in its own transaction (``BEGIN IMMEDIATE`` for writes so read-modify-write is atomic across
    processes)."""

    def __init__(self, directory: Path, *, busy_timeout_s: float = 30.0, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DB_NAME
        self._lock = threading.Lock()
        conn = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            conn.execute("BEGIN IMMEDIATE")
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn

    def _run(self, fn: Callable[[sqlite3.Connection], T], begin: str) -> T:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError("store is closed")
            try:
                conn.execute(begin)
            except sqlite3.Error as exc:
                raise StoreError(f"sqlite: {exc}") from exc
            try:
                out = fn(conn)
                conn.execute("COMMIT")
                return out
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"sqlite: {exc}") from exc
                raise

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._run, fn, "BEGIN IMMEDIATE")

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._run, fn, "BEGIN")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# ------------------------------------------------------------------------------------------------------ tasks


def _load_task(row: tuple[str] | None) -> TaskRecord | None:
    return TaskRecord.model_validate_json(row[0]) if row else None


def _get_task(conn: sqlite3.Connection, task_id: str) -> TaskRecord | None:
    return _load_task(conn.execute("SELECT record FROM tasks WHERE id = ?", (task_id,)).fetchone())


def _save_task(conn: sqlite3.Connection, rec: TaskRecord) -> None:
    conn.execute(
        "UPDATE tasks SET status = ?, lease_expires_at = ?, expires_at = ?, last_event_id = ?, record = ? "
        "WHERE id = ?",
        (rec.status, rec.lease_expires_at, rec.expires_at, rec.last_event_id, rec.model_dump_json(), rec.id),
    )


def _event(conn: sqlite3.Connection, rec: TaskRecord, type: str, data: dict[str, Any], ts: float) -> TaskEvent:
    """Append an event to ``rec`` (the caller saves ``rec`` afterwards, in the same transaction)."""
    rec.last_event_id += 1
    conn.execute(
        "INSERT INTO task_events (task_id, id, type, data, ts) VALUES (?, ?, ?, ?, ?)",
        (rec.id, rec.last_event_id, type, _dumps(data), ts),
    )
    return TaskEvent(id=rec.last_event_id, task_id=rec.id, type=type, data=data, ts=ts)


def _end(conn: sqlite3.Connection, rec: TaskRecord, status: str, t: float, data: dict[str, Any]) -> None:
    rec.status = status  # type: ignore[assignment]
    rec.finished_at = rec.updated_at = t
    rec.expires_at = t + rec.retention_s
    rec.lease_worker = rec.lease_token = None
    rec.lease_expires_at = None
    _event(conn, rec, "status", {"status": status, **data}, t)
    _save_task(conn, rec)


def _current(rec: TaskRecord | None, lease: Lease) -> bool:
    return rec is not None and rec.status == "running" and rec.lease_token == lease.token


def _encode_cursor(rec: TaskRecord) -> str:
    return base64.urlsafe_b64encode(_dumps([rec.created_at, rec.id]).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created_at, task_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(created_at), str(task_id)
    except (ValueError, TypeError) as exc:
        raise InvalidCursor("invalid cursor") from exc


class SqliteTaskStore:
    """:class:`~connectors.stores.base.TaskStore` on ``directory/stores.db``."""

    def __init__(self, directory: str | Path, **db_options: Any) -> None:
        self._db = _Db(Path(directory), **db_options)

    async def submit(
        self, owner: str, submission: TaskSubmission, *, max_attempts: int = 3, retention_s: float = 7 * 24 * 3600.0
    ) -> tuple[TaskRecord, bool]:
        def tx(conn: sqlite3.Connection) -> tuple[TaskRecord, bool]:
            if submission.idempotency_key is not None:
                row = conn.execute(
                    "SELECT record FROM tasks WHERE owner = ? AND idempotency_key = ?",
                    (owner, submission.idempotency_key),
                ).fetchone()
                if row:
                    return _load_task(row), False  # type: ignore[return-value]
            t = now()
            rec = TaskRecord(
                id=new_id("task"), owner=owner, type=submission.type, input=submission.input,
                options=submission.options, idempotency_key=submission.idempotency_key, created_at=t, updated_at=t,
                max_attempts=max_attempts, retention_s=retention_s,
            )
            conn.execute(
                "INSERT INTO tasks (id, owner, type, status, created_at, idempotency_key, record) "
                "VALUES (?, ?, ?, ?, ?, ?, '')",
                (rec.id, owner, rec.type, rec.status, t, rec.idempotency_key),
            )
            _event(conn, rec, "status", {"status": "queued"}, t)
            _save_task(conn, rec)
            return rec, True

        return await self._db.write(tx)

    async def get(self, task_id: str, owner: str | None) -> TaskRecord | None:
        rec = await self._db.read(lambda conn: _get_task(conn, task_id))
        if rec is None or (owner is not None and rec.owner != owner):
            return None
        return rec

    async def list(
        self, owner: str, *, status: str | None = None, type: str | None = None, limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        limit = max(1, min(int(limit), 500))
        where, args = ["owner = ?"], [owner]
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if type is not None:
            where.append("type = ?")
            args.append(type)
        if cursor:
            c_at, c_id = _decode_cursor(cursor)
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args += [c_at, c_at, c_id]  # type: ignore[list-item]
        sql = (f"SELECT record FROM tasks WHERE {' AND '.join(where)} "
               "ORDER BY created_at DESC, id DESC LIMIT ?")
        rows = await self._db.read(lambda conn: conn.execute(sql, (*args, limit + 1)).fetchall())
        tasks = [TaskRecord.model_validate_json(r[0]) for r in rows[:limit]]
        return TaskPage(tasks=tasks, next_cursor=_encode_cursor(tasks[-1]) if len(rows) > limit else None)

    async def cancel(self, task_id: str, owner: str | None) -> TaskRecord | None:
        def tx(conn: sqlite3.Connection) -> TaskRecord | None:
            rec = _get_task(conn, task_id)
            if rec is None or (owner is not None and rec.owner != owner):
                return None
            t = now()
            if rec.status == "queued":
                _end(conn, rec, "cancelled", t, {})
            elif rec.status == "running" and not rec.cancel_requested:
                rec.cancel_requested = True
                rec.updated_at = t
                _event(conn, rec, "cancel_requested", {}, t)
                _save_task(conn, rec)
            return rec

        return await self._db.write(tx)

    async def lease(self, worker_id: str, *, lease_s: float, types: list[str] | None = None) -> Lease | None:
        if types is not None and not types:
            return None
        token = new_id("lease")

        def tx(conn: sqlite3.Connection) -> Lease | None:
            t = now()
            # Expired leases first: cancel / fail those that may not run again; keep the oldest re-runnable one.
            reclaim: TaskRecord | None = None
            rows = conn.execute(
                "SELECT record FROM tasks WHERE status = 'running' AND lease_expires_at < ? "
                "ORDER BY created_at, id LIMIT 200", (t,),
            ).fetchall()
            for row in rows:
                rec = TaskRecord.model_validate_json(row[0])
                if rec.cancel_requested:
                    _end(conn, rec, "cancelled", t, {})
                elif rec.attempts >= rec.max_attempts:
                    err = TaskError(code="lease_expired", message=f"lease expired after {rec.attempts} attempt(s)")
                    rec.error = err
                    _end(conn, rec, "failed", t, {"error": err.model_dump()})
                elif reclaim is None and (types is None or rec.type in types):
                    reclaim = rec
            sql = "SELECT record FROM tasks WHERE status = 'queued'"
            args: list[Any] = []
            if types is not None:
                sql += f" AND type IN ({','.join('?' * len(types))})"
                args += types
            queued = _load_task(conn.execute(sql + " ORDER BY created_at, id LIMIT 1", args).fetchone())
            rec = min((r for r in (reclaim, queued) if r is not None), key=lambda r: (r.created_at, r.id),
                      default=None)
            if rec is None:
                return None
            rec.status = "running"
            rec.attempts += 1
            rec.lease_worker, rec.lease_token, rec.lease_expires_at = worker_id, token, t + lease_s
            rec.started_at = rec.started_at if rec.started_at is not None else t
            rec.updated_at = t
            _event(conn, rec, "status", {"status": "running", "attempt": rec.attempts}, t)
            _save_task(conn, rec)
            return Lease(task=rec, token=token, worker_id=worker_id, expires_at=rec.lease_expires_at)

        return await self._db.write(tx)

    async def renew(self, lease: Lease, lease_s: float) -> LeaseState:
        def tx(conn: sqlite3.Connection) -> LeaseState:
            rec = _get_task(conn, lease.task.id)
            if not _current(rec, lease):
                return "lost"
            assert rec is not None
            t = now()
            rec.lease_expires_at, rec.updated_at = t + lease_s, t
            _save_task(conn, rec)
            return "cancel_requested" if rec.cancel_requested else "ok"

        return await self._db.write(tx)

    async def set_session(self, lease: Lease, session_id: str) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            rec = _get_task(conn, lease.task.id)
            if not _current(rec, lease):
                return False
            assert rec is not None
            rec.session_id, rec.updated_at = session_id, now()
            _save_task(conn, rec)
            return True

        return await self._db.write(tx)

    async def set_progress(self, lease: Lease, progress: Progress) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            rec = _get_task(conn, lease.task.id)
            if not _current(rec, lease):
                return False
            assert rec is not None
            t = now()
            rec.progress, rec.updated_at = progress, t
            _event(conn, rec, "progress", progress.model_dump(), t)
            _save_task(conn, rec)
            return True

        return await self._db.write(tx)

    async def append_event(self, task_id: str, type: str, data: dict[str, Any]) -> TaskEvent:
        data = json.loads(_dumps(data))  # what a reader will get back

        def tx(conn: sqlite3.Connection) -> TaskEvent:
            rec = _get_task(conn, task_id)
            if rec is None:
                raise NotFound(f"no task {task_id}")
            ev = _event(conn, rec, type, data, now())
            _save_task(conn, rec)
            return ev

        return await self._db.write(tx)

    async def events(self, task_id: str, after: int = 0, limit: int = 1000) -> list[TaskEvent]:
        rows = await self._db.read(lambda conn: conn.execute(
            "SELECT id, type, data, ts FROM task_events WHERE task_id = ? AND id > ? ORDER BY id LIMIT ?",
            (task_id, after, limit),
        ).fetchall())
        return [TaskEvent(id=i, task_id=task_id, type=ty, data=json.loads(d), ts=ts) for i, ty, d, ts in rows]

    async def wait_events(self, task_id: str, after: int, timeout_s: float, limit: int = 1000) -> list[TaskEvent]:
        """Polls (20 ms, growing to 200 ms): SQLite has no cross-process notification."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        delay = 0.02
        while True:
            evs = await self.events(task_id, after, limit)
            left = deadline - loop.time()
            if evs or left <= 0:
                return evs
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 1.5, 0.2)

    async def finish(
        self, lease: Lease, status: Literal["succeeded", "failed", "cancelled"], *, result: Any = None,
        error: TaskError | None = None,
    ) -> bool:
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish status must be one of {sorted(TERMINAL_STATUSES)}, got {status!r}")
        result = json.loads(_dumps(result))

        def tx(conn: sqlite3.Connection) -> bool:
            rec = _get_task(conn, lease.task.id)
            if not _current(rec, lease):
                return False
            assert rec is not None
            rec.result, rec.error = result, error
            _end(conn, rec, status, now(), {"error": error.model_dump()} if error is not None else {})
            return True

        return await self._db.write(tx)

    async def release(self, lease: Lease, *, count_attempt: bool = False) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            rec = _get_task(conn, lease.task.id)
            if not _current(rec, lease):
                return False
            assert rec is not None
            t = now()
            if rec.cancel_requested:  # nobody should run it again
                _end(conn, rec, "cancelled", t, {})
                return True
            rec.status = "queued"
            rec.attempts = rec.attempts if count_attempt else max(0, rec.attempts - 1)
            rec.lease_worker = rec.lease_token = None
            rec.lease_expires_at = None
            rec.updated_at = t
            _event(conn, rec, "status", {"status": "queued", "reason": "released"}, t)
            _save_task(conn, rec)
            return True

        return await self._db.write(tx)

    async def purge_expired(self, at: float | None = None) -> int:
        at = now() if at is None else at
        statuses = tuple(sorted(TERMINAL_STATUSES))

        def tx(conn: sqlite3.Connection) -> int:
            ids = [r[0] for r in conn.execute(
                f"SELECT id FROM tasks WHERE expires_at < ? AND status IN ({','.join('?' * len(statuses))})",
                (at, *statuses),
            ).fetchall()]
            for task_id in ids:  # the idempotency key lives on the row: it goes with it
                conn.execute("DELETE FROM task_events WHERE task_id = ?", (task_id,))
                conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
            return len(ids)

        return await self._db.write(tx)

    async def close(self) -> None:
        self._db.close()


# --------------------------------------------------------------------------------------------------- sessions


def _live_session(
    conn: sqlite3.Connection, session_id: str, owner: str | None, t: float
) -> tuple[SessionRecord, float | None] | None:
    """The session and its TTL if it exists for ``owner`` and has not expired."""
    row = conn.execute("SELECT record, ttl_s FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        return None
    rec = SessionRecord.model_validate_json(row[0])
    if (owner is not None and rec.owner != owner) or (rec.expires_at is not None and rec.expires_at <= t):
        return None
    return rec, row[1]


def _touch_session(conn: sqlite3.Connection, rec: SessionRecord, ttl_s: float | None, t: float) -> None:
    """Save ``rec`` after a write: ``updated_at`` now and the TTL renewed."""
    rec.updated_at = t
    if ttl_s is not None:
        rec.expires_at = t + ttl_s
    conn.execute("UPDATE sessions SET expires_at = ?, record = ? WHERE id = ?",
                 (rec.expires_at, rec.model_dump_json(), rec.id))


def _delete_sessions(conn: sqlite3.Connection, ids: list[str]) -> None:
    for sid in ids:
        conn.execute("DELETE FROM session_messages WHERE session_id = ?", (sid,))
        conn.execute("DELETE FROM session_partials WHERE session_id = ?", (sid,))
        conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))


class SqliteSessionStore:
    """:class:`~connectors.stores.base.SessionStore` on ``directory/stores.db``; media over ``blob_threshold``
    bytes goes to ``blobs``. Expired sessions are invisible at once and deleted by :meth:`purge_expired`
    (also run now and then by :meth:`create`)."""

    def __init__(self, directory: str | Path, blobs: BlobStore, *, blob_threshold: int = 64 * 1024,
                 **db_options: Any) -> None:
        self._db = _Db(Path(directory), **db_options)
        self.blobs = blobs
        self.blob_threshold = blob_threshold

    async def create(
        self, owner: str, *, parent_id: str | None = None, metadata: dict[str, Any] | None = None,
        ttl_s: float | None = None, session_id: str | None = None,
    ) -> SessionRecord:
        metadata = json.loads(_dumps(metadata or {}))

        def tx(conn: sqlite3.Connection) -> SessionRecord:
            t = now()
            _purge_sessions(conn, t, limit=100)
            if session_id is not None:
                row = conn.execute("SELECT record FROM sessions WHERE id = ?", (session_id,)).fetchone()
                if row is not None:
                    existing = SessionRecord.model_validate_json(row[0])
                    if existing.owner != owner:
                        raise StoreError("session id taken")
                    return existing
            if parent_id is not None and _live_session(conn, parent_id, owner, t) is None:
                raise NotFound(f"no session {parent_id}")
            rec = SessionRecord(
                id=session_id or new_id("sess"), owner=owner, parent_id=parent_id, created_at=t, updated_at=t,
                expires_at=t + ttl_s if ttl_s is not None else None, metadata=metadata,
            )
            conn.execute(
                "INSERT INTO sessions (id, owner, parent_id, ttl_s, expires_at, record) VALUES (?, ?, ?, ?, ?, ?)",
                (rec.id, owner, parent_id, ttl_s, rec.expires_at, rec.model_dump_json()),
            )
            return rec

        return await self._db.write(tx)

    async def get(self, session_id: str, owner: str | None) -> SessionRecord | None:
        found = await self._db.read(lambda conn: _live_session(conn, session_id, owner, now()))
        return found[0] if found else None

    async def append(
        self, session_id: str, owner: str | None, messages: list[dict[str, Any]], *, token_count: int = 0
    ) -> SessionRecord:
        rec = await self.get(session_id, owner)
        if rec is None:
            raise NotFound(f"no session {session_id}")
        stored, _ = await media.externalize(messages, self.blobs, rec.owner, self.blob_threshold)
        rows = [_message_json(m) for m in stored]

        def tx(conn: sqlite3.Connection) -> SessionRecord:
            t = now()
            found = _live_session(conn, session_id, owner, t)
            if found is None:
                raise NotFound(f"no session {session_id}")
            cur, ttl_s = found
            for k, body in enumerate(rows):
                conn.execute("INSERT INTO session_messages (session_id, idx, message) VALUES (?, ?, ?)",
                             (session_id, cur.message_count + k, _dumps({**body, "ts": t})))
            cur.message_count += len(rows)
            cur.token_count += int(token_count)
            _touch_session(conn, cur, ttl_s, t)
            return cur

        return await self._db.write(tx)

    async def messages(
        self, session_id: str, owner: str | None, *, start: int = 0, end: int | None = None,
        resolve_media: bool = False,
    ) -> list[SessionMessage]:
        def tx(conn: sqlite3.Connection) -> tuple[SessionRecord, list[tuple[int, str]]]:
            found = _live_session(conn, session_id, owner, now())
            if found is None:
                raise NotFound(f"no session {session_id}")
            rec = found[0]
            lo, hi, _ = slice(start, end).indices(rec.message_count)
            rows = conn.execute(
                "SELECT idx, message FROM session_messages WHERE session_id = ? AND idx >= ? AND idx < ? "
                "ORDER BY idx", (session_id, lo, hi),
            ).fetchall()
            return rec, rows

        rec, rows = await self._db.read(tx)
        out = [SessionMessage(index=i, **json.loads(m)) for i, m in rows]
        if resolve_media:
            resolved = await media.resolve([{"content": m.content} for m in out], self.blobs, rec.owner)
            for m, r in zip(out, resolved):
                m.content = r["content"]
        return out

    async def set_partial(self, session_id: str, owner: str | None, key: str, value: Any) -> None:
        body = _dumps(value)

        def tx(conn: sqlite3.Connection) -> None:
            t = now()
            found = _live_session(conn, session_id, owner, t)
            if found is None:
                raise NotFound(f"no session {session_id}")
            conn.execute("INSERT OR REPLACE INTO session_partials (session_id, key, value) VALUES (?, ?, ?)",
                         (session_id, key, body))
            _touch_session(conn, found[0], found[1], t)

        await self._db.write(tx)

    async def partials(self, session_id: str, owner: str | None) -> dict[str, Any]:
        def tx(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            if _live_session(conn, session_id, owner, now()) is None:
                raise NotFound(f"no session {session_id}")
            return conn.execute("SELECT key, value FROM session_partials WHERE session_id = ?",
                                (session_id,)).fetchall()

        return {k: json.loads(v) for k, v in await self._db.read(tx)}

    async def update_metadata(self, session_id: str, owner: str | None, metadata: dict[str, Any]) -> SessionRecord:
        metadata = json.loads(_dumps(metadata))

        def tx(conn: sqlite3.Connection) -> SessionRecord:
            t = now()
            found = _live_session(conn, session_id, owner, t)
            if found is None:
                raise NotFound(f"no session {session_id}")
            rec, ttl_s = found
            rec.metadata = {**rec.metadata, **metadata}
            _touch_session(conn, rec, ttl_s, t)
            return rec

        return await self._db.write(tx)

    async def children(self, session_id: str, owner: str | None) -> list[SessionRecord]:
        def tx(conn: sqlite3.Connection) -> list[SessionRecord]:
            t = now()
            if _live_session(conn, session_id, owner, t) is None:
                raise NotFound(f"no session {session_id}")
            rows = conn.execute("SELECT record FROM sessions WHERE parent_id = ? ORDER BY seq", (session_id,))
            recs = [SessionRecord.model_validate_json(r[0]) for r in rows.fetchall()]
            return [r for r in recs if r.expires_at is None or r.expires_at > t]

        return await self._db.read(tx)

    async def delete(self, session_id: str, owner: str | None) -> bool:
        def tx(conn: sqlite3.Connection) -> bool:
            if _live_session(conn, session_id, owner, now()) is None:
                return False
            _delete_sessions(conn, _descendants(conn, session_id))
            return True

        return await self._db.write(tx)

    async def purge_expired(self, at: float | None = None) -> int:
        """Delete sessions whose TTL ran out (with their messages and partials; children have TTLs of their
        own). Not in the protocol: the Redis store's keys expire by themselves."""
        t = now() if at is None else at
        return await self._db.write(lambda conn: _purge_sessions(conn, t, limit=None))

    async def close(self) -> None:
        self._db.close()


def _message_json(msg: dict[str, Any]) -> dict[str, Any]:
    """What a stored message row holds (besides ``ts``): the message with its own ``token_count``."""
    if not isinstance(msg.get("role"), str):
        raise StoreError("a session message needs a string 'role'")
    body = dict(msg)
    body.setdefault("content", None)
    body["token_count"] = int(body.get("token_count") or 0)
    body.pop("index", None)
    body.pop("ts", None)
    return body


def _descendants(conn: sqlite3.Connection, session_id: str) -> list[str]:
    out, todo = [], [session_id]
    while todo:
        sid = todo.pop()
        out.append(sid)
        todo += [r[0] for r in conn.execute("SELECT id FROM sessions WHERE parent_id = ?", (sid,)).fetchall()]
    return out


def _purge_sessions(conn: sqlite3.Connection, t: float, limit: int | None) -> int:
    sql = "SELECT id FROM sessions WHERE expires_at IS NOT NULL AND expires_at <= ?"
    ids = [r[0] for r in conn.execute(sql + (f" LIMIT {int(limit)}" if limit else ""), (t,)).fetchall()]
    for sid in ids:
        _delete_sessions(conn, [sid])
    return len(ids)


# ------------------------------------------------------------------------------------------------------ blobs

_REF = re.compile(r"^[0-9a-f]{64}$")
_SAFE_OWNER = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}$")


class FileBlobStore:
    """:class:`~connectors.stores.base.BlobStore` as files ``directory/<owner>/<sha[:2]>/<sha>`` with a
    ``<sha>.json`` beside each (size, content type). Writes go to a temp file then ``os.replace`` so a reader
    (any process) sees a whole blob or none; the metadata is written last, so a blob exists once it has one."""

    def __init__(self, directory: str | Path) -> None:
        self.root = Path(directory)
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, owner: str, ref: str) -> tuple[Path, Path]:
        if not _REF.match(ref):
            raise ValueError("not a blob ref")
        # an owner that is not a plain name (slashes, dots, very long) gets a hashed directory name
        name = owner if _SAFE_OWNER.match(owner) else "h_" + hashlib.sha256(owner.encode()).hexdigest()
        path = self.root / name / ref[:2] / ref
        return path, path.with_name(ref + ".json")

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _info(self, owner: str, ref: str) -> BlobRef | None:
        try:
            _, meta = self._paths(owner, ref)
            return BlobRef.model_validate_json(meta.read_bytes())
        except (ValueError, OSError):
            return None

    def _put(self, owner: str, data: bytes, content_type: str) -> BlobRef:
        ref = hashlib.sha256(data).hexdigest()
        existing = self._info(owner, ref)
        if existing is not None:
            return existing
        path, meta = self._paths(owner, ref)
        info = BlobRef(ref=ref, size=len(data), content_type=content_type)
        self._atomic_write(path, data)
        self._atomic_write(meta, info.model_dump_json().encode())
        return info

    def _get(self, owner: str, ref: str) -> bytes | None:
        if self._info(owner, ref) is None:
            return None
        try:
            return self._paths(owner, ref)[0].read_bytes()
        except OSError:
            return None

    def _delete(self, owner: str, ref: str) -> bool:
        try:
            path, meta = self._paths(owner, ref)
        except ValueError:
            return False
        existed = meta.exists()
        for p in (meta, path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return existed

    async def put(self, owner: str, data: bytes, content_type: str = "application/octet-stream") -> BlobRef:
        return await asyncio.to_thread(self._put, owner, bytes(data), content_type)

    async def get(self, owner: str, ref: str) -> bytes | None:
        return await asyncio.to_thread(self._get, owner, ref)

    async def info(self, owner: str, ref: str) -> BlobRef | None:
        return await asyncio.to_thread(self._info, owner, ref)

    async def delete(self, owner: str, ref: str) -> bool:
        return await asyncio.to_thread(self._delete, owner, ref)

    async def close(self) -> None:
        return None
