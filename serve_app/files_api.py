"""OpenAI Files API reads: ``files.retrieve``, ``files.content`` (a batch's output and error files) and
``files.delete``. Records live in the session store (``connectors.stores.files``): another key's file is a 404
like a missing one. ``files.create`` is ``POST /v1/files`` (``tasks_api`` -> ``serve_app.openai_files``).

``GET /v1/files/{id}`` also takes a plain blob ref (64 hex digits: an upload made without ``purpose``, a task's
screenshot or artifact) and answers its bytes: the console shows screenshots and uploaded videos that way."""

from __future__ import annotations

from typing import Any

import re

from fastapi import APIRouter, Request, Response

from connectors.stores.files import FileRecord, delete_file, get_file
from serve_app.task_service import NotFoundError
from serve_app.tasks_api import Service, _owner

router = APIRouter()

BLOB_REF = re.compile(r"^[0-9a-f]{64}$")
# A stored file may be anything (an uploaded HTML file, an SVG): never let a browser run it if opened directly.
FILE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox",
                "Cache-Control": "private, max-age=3600"}


async def _file(request: Request, service: Any, file_id: str) -> FileRecord:
    record = await get_file(service.stores.sessions, _owner(request), file_id)
    if record is None:
        raise NotFoundError(f"file {file_id!r} not found", param="file_id")
    return record


async def _blob_bytes(request: Request, service: Any, ref: str) -> Response:
    blobs = service.stores.blobs
    info = await blobs.info(_owner(request), ref)
    data = await blobs.get(_owner(request), ref) if info is not None else None
    if info is None or data is None:
        raise NotFoundError(f"file {ref!r} not found", param="file_id")
    return Response(data, media_type=info.content_type or "application/octet-stream",
                    headers={**FILE_HEADERS, "Content-Disposition": f'attachment; filename="{ref[:16]}"'})


@router.get("/v1/files/{file_id}", tags=["openai"], response_model=None)
async def retrieve_file(request: Request, service: Service, file_id: str) -> dict[str, Any] | Response:
    """An OpenAI file's record (``file-…``), or a blob ref's bytes."""
    if BLOB_REF.match(file_id):
        return await _blob_bytes(request, service, file_id)
    return (await _file(request, service, file_id)).public()


@router.get("/v1/files/{file_id}/content", tags=["openai"])
async def file_content(request: Request, service: Service, file_id: str) -> Response:
    """The file's bytes (for a batch's output and error files: JSONL, one line per request)."""
    record = await _file(request, service, file_id)
    data = await service.stores.blobs.get(_owner(request), record.ref)
    if data is None:
        raise NotFoundError(f"the content of file {file_id!r} is gone (retention)", param="file_id")
    return Response(data, media_type=record.content_type)


@router.delete("/v1/files/{file_id}", tags=["openai"])
async def remove_file(request: Request, service: Service, file_id: str) -> dict[str, Any]:
    await _file(request, service, file_id)
    await delete_file(service.stores.sessions, _owner(request), file_id)
    return {"id": file_id, "object": "file", "deleted": True}
