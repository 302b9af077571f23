"""OpenAI-style file records (``file-…`` ids with a filename and a ``purpose``) over the session and blob stores.

Why here and not a new store: the bytes are a content-addressed blob (``BlobStore``) and the record is a session
whose id is the file id and whose metadata holds the file's fields. Both backends (Redis, SQLite) already keep
those durably, per owner, with a TTL, so the ingress (``POST /v1/files``) and the batch agent (which writes the
output and error files) share one definition with no schema change to either store.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel

from connectors.stores.base import BlobStore, SessionStore

FILE_KIND = "openai_file"
FILE_TTL_S = 30 * 24 * 3600.0  # uploads and batch output files are kept 30 days (as OpenAI's batch files)


class FileRecord(BaseModel):
    """The OpenAI file object (``object: "file"``) plus the blob it points to."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    ref: str
    content_type: str = "application/octet-stream"
    expires_at: int | None = None

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "expires_at": self.expires_at}


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


async def create_file(sessions: SessionStore, blobs: BlobStore, owner: str, data: bytes, *, filename: str,
                      purpose: str, content_type: str = "application/octet-stream", ttl_s: float | None = None,
                      file_id: str | None = None) -> FileRecord:
    """Store ``data`` and its record. ``file_id`` lets a resumable writer (the batch agent) pick a deterministic
    id, so a re-run after a crash returns the same file instead of a second one."""
    ref = await blobs.put(owner, data, content_type)
    created = int(time.time())
    record = FileRecord(id=file_id or new_file_id(), bytes=len(data), created_at=created, filename=filename,
                        purpose=purpose, ref=ref.ref, content_type=content_type,
                        expires_at=int(created + ttl_s) if ttl_s else None)
    session = await sessions.create(owner, session_id=record.id, ttl_s=ttl_s,
                                    metadata={"kind": FILE_KIND, "file": record.model_dump()})
    stored = session.metadata.get("file")
    return FileRecord.model_validate(stored) if isinstance(stored, dict) else record


async def get_file(sessions: SessionStore, owner: str | None, file_id: str) -> FileRecord | None:
    """The record, or ``None`` when missing, expired, another owner's, or not a file."""
    if not file_id.startswith("file-"):
        return None
    session = await sessions.get(file_id, owner)
    if session is None or session.metadata.get("kind") != FILE_KIND:
        return None
    return FileRecord.model_validate(session.metadata["file"])


async def read_file(sessions: SessionStore, blobs: BlobStore, owner: str, file_id: str) -> bytes | None:
    record = await get_file(sessions, owner, file_id)
    if record is None:
        return None
    return await blobs.get(owner, record.ref)


async def delete_file(sessions: SessionStore, owner: str, file_id: str) -> bool:
    """Drop the record; the blob is content-addressed (another file may share it) and expires with retention."""
    if await get_file(sessions, owner, file_id) is None:
        return False
    return await sessions.delete(file_id, owner)
