"""OpenAI Files API reads: ``files.retrieve``, ``files.content`` (a batch's output and error files) and
``files.delete``. Records live in the session store (``connectors.stores.files``): another key's file is a 404
like a missing one. ``files.create`` is ``POST /v1/files`` (``tasks_api`` -> ``serve_app.openai_files``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from connectors.stores.files import FileRecord, delete_file, get_file
from serve_app.task_service import NotFoundError
from serve_app.tasks_api import Service, _owner

router = APIRouter()


async def _file(request: Request, service: Any, file_id: str) -> FileRecord:
    record = await get_file(service.stores.sessions, _owner(request), file_id)
    if record is None:
        raise NotFoundError(f"file {file_id!r} not found", param="file_id")
    return record


@router.get("/v1/files/{file_id}", tags=["openai"])
async def retrieve_file(request: Request, service: Service, file_id: str) -> dict[str, Any]:
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
