"""Durable task, session and blob stores: Redis for a cluster, SQLite + files for one machine.

:func:`open_stores` picks the implementation from a URL so callers (ingress, runners, the SDK) never name
one::

    None | "embedded"        -> SQLite + files under connectors.paths.data_dir() / "stores" (or ``home``)
    "sqlite:///abs/dir"      -> SQLite + files in /abs/dir
    "redis://host:port/db"   -> Redis (also rediss://, unix://)
    "redis+sentinel://h1:26379,h2:26379,h3:26379/service[/db]"
                             -> Redis behind Sentinel: the primary is looked up, and found again after a failover
                                (see connectors.stores.sentinel; Kombu's sentinel://h1;sentinel://h2/service too)

"Accepted means replicated": with ``min_replica_acks`` > 0 every write of the Redis stores (task submission, each
task state transition, session writes, blobs) returns only after ``WAIT`` confirmed it on that many replicas, else
raises :class:`~connectors.stores.redis_store.NotReplicated` (a StoreError: HTTP 503 + Retry-After). The default
(``None``) is 1 for a Sentinel URL and 0 for a single Redis.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connectors.paths import data_dir
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
    SessionStore,
    StoreError,
    TaskError,
    TaskEvent,
    TaskPage,
    TaskRecord,
    TaskStatus,
    TaskStore,
    TaskSubmission,
    new_id,
)

__all__ = [
    "TERMINAL_STATUSES", "BlobRef", "BlobStore", "InvalidCursor", "Lease", "LeaseState", "NotFound", "Progress",
    "SessionMessage", "SessionRecord", "SessionStore", "StoreError", "TaskError", "TaskEvent", "TaskPage",
    "TaskRecord", "TaskStatus", "TaskStore", "TaskSubmission", "new_id", "Stores", "open_stores", "redact_url",
    "stores_url_from_env", "default_replica_acks",
]


@dataclass
class Stores:
    """The three stores of one backend, opened together; ``url`` says which backend (for logs: any password in
    the URL is masked, see :func:`redact_url`)."""

    tasks: TaskStore
    sessions: SessionStore
    blobs: BlobStore
    url: str
    clients: list[Any] = field(default_factory=list, repr=False)  # shared connections the stores only borrow

    async def close(self) -> None:
        await self.tasks.close()
        await self.sessions.close()
        await self.blobs.close()
        for client in self.clients:
            await client.aclose()
        self.clients = []


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)@")
_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with its password masked (``user:***@``, a lone ``***@`` token, ``?password=***``): store URLs
    get logged and echoed in errors, their credentials must not be."""

    def userinfo(m: re.Match[str]) -> str:
        user, has_password, _ = m.group(2).partition(":")
        return f"{m.group(1)}{user + ':' if has_password and user else ''}***@"

    return _PASSWORD_PARAM.sub(r"\1***", _USERINFO.sub(userinfo, url))


def stores_url_from_env() -> str | None:
    """``$KIMIRAY_STORES_URL``, else ``$REDIS_URL``, else ``None`` (embedded)."""
    return os.environ.get("KIMIRAY_STORES_URL") or os.environ.get("REDIS_URL") or None


def default_replica_acks(url: str | None) -> int:
    """Replicas that must confirm a write by default: 1 behind Sentinel (a failover must not lose an accepted
    write), 0 for a single Redis or the embedded store (nothing to wait for)."""
    from connectors.stores.sentinel import is_sentinel_url

    return 1 if is_sentinel_url(url) else 0


def open_stores(
    url: str | None = None, *, home: Path | None = None, blob_threshold: int = 64 * 1024, key_prefix: str = "kr",
    min_replica_acks: int | None = None, replica_ack_timeout_s: float = 2.0,
) -> Stores:
    """Open the stores named by ``url`` (see module docstring). Nothing connects yet for Redis: the first
    call does, so this is safe outside an event loop. ``key_prefix`` and the replica acks only apply to Redis."""
    if url is None or url == "embedded":
        if home is None:
            home = data_dir() / "stores"
        return _embedded(Path(home), blob_threshold, url="embedded")
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path.startswith("/"):
            raise StoreError(f"sqlite URL needs an absolute directory (sqlite:///abs/dir), got {redact_url(url)!r}")
        return _embedded(Path(path), blob_threshold, url=url)
    from connectors.stores.sentinel import is_sentinel_url

    if url.startswith(("redis://", "rediss://", "unix://")) or is_sentinel_url(url):
        from connectors.stores.redis_store import (
            RedisBlobStore,
            RedisSessionStore,
            RedisTaskStore,
            ReplicaAcks,
            connect,
        )

        acks = ReplicaAcks(count=default_replica_acks(url) if min_replica_acks is None else min_replica_acks,
                           timeout_s=replica_ack_timeout_s)
        text, binary = connect(url), connect(url, decode_responses=False)
        blobs = RedisBlobStore(binary, key_prefix=key_prefix, acks=acks)
        return Stores(
            tasks=RedisTaskStore(text, key_prefix=key_prefix, acks=acks),
            sessions=RedisSessionStore(text, blobs, key_prefix=key_prefix, blob_threshold=blob_threshold,
                                       acks=acks),
            blobs=blobs,
            url=redact_url(url),
            clients=[text, binary],
        )
    raise StoreError(f"unknown stores URL {redact_url(url)!r} "
                     "(expected embedded, sqlite:///dir, redis://host:port/db or "
                     "redis+sentinel://host:26379,host2:26379/service_name)")


def _embedded(directory: Path, blob_threshold: int, *, url: str) -> Stores:
    from connectors.stores.sqlite import FileBlobStore, SqliteSessionStore, SqliteTaskStore

    blobs = FileBlobStore(directory / "blobs")
    return Stores(
        tasks=SqliteTaskStore(directory),
        sessions=SqliteSessionStore(directory, blobs, blob_threshold=blob_threshold),
        blobs=blobs,
        url=url,
    )

