"""OpenAI Files API subset for the Batch API: ``files.create`` (multipart, ``purpose``), ``retrieve``,
``content`` and ``delete``.

``POST /v1/files`` with a multipart body lands here (``tasks_api.upload_file`` hands it over); a raw body keeps
the task API's blob upload. A ``purpose="batch"`` file is checked line by line at upload, so a malformed line is a
400 naming it before any batch exists. Records live in the session store (``connectors.stores.files``): another
key's file is a 404 like a missing one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from agents.batch import BatchFileError, parse_batch_jsonl
from connectors.stores.files import create_file, delete_file, get_file
from serve_app.errors import ClientInputError
from serve_app.tasks_api import NotFoundError, _admit_create, _owner, _service

router = APIRouter()

PURPOSES = ("batch", "user_data", "vision", "assistants", "fine-tune", "evals")
FILE_TTL_S = 30 * 24 * 3600.0


def batch_file_error(exc: BatchFileError, param: str = "file") -> ClientInputError:
    """The 400 for a malformed batch input file: the message names the line; ``param`` is ``file`` (upload) or
    ``input_file_id`` (batch creation)."""
    return ClientInputError(f"invalid batch input file: {exc}", status_code=400, code="invalid_batch_file",
                            param=param)


async def create_openai_file(request: Request) -> JSONResponse:
    """``multipart/form-data`` with ``file`` and ``purpose`` (what the official client sends)."""
    _admit_create(request)
    try:
        form = await request.form()
    except Exception as exc:
        raise ClientInputError(f"unreadable multipart body: {exc}", param="file") from None
    purpose = form.get("purpose")
    upload = form.get("file")
    if not isinstance(purpose, str) or purpose not in PURPOSES:
        raise ClientInputError(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
    if upload is None or isinstance(upload, str):
        raise ClientInputError("the multipart body needs a 'file' part", param="file")
    data = await upload.read()
    if not data:
        raise ClientInputError("the file is empty", param="file")
    if purpose == "batch":
        try:
            await asyncio.to_thread(parse_batch_jsonl, data)  # 50,000 lines: off the event loop
        except BatchFileError as exc:
            raise batch_file_error(exc) from None
    service = _service(request)
    record = await create_file(service.stores.sessions, service.stores.blobs, _owner(request), data,
                               filename=(upload.filename or "upload")[:255], purpose=purpose,
                               content_type=upload.content_type or "application/octet-stream", ttl_s=FILE_TTL_S)
    return JSONResponse(record.public(), status_code=201)  # the route's status; the official client takes any 2xx


async def _file(request: Request, file_id: str) -> Any:
    record = await get_file(_service(request).stores.sessions, _owner(request), file_id)
    if record is None:
        raise NotFoundError(f"file {file_id!r} not found", param="file_id")
    return record


@router.get("/v1/files/{file_id}", tags=["openai"])
async def retrieve_file(request: Request, file_id: str) -> dict[str, Any]:
    return (await _file(request, file_id)).public()


@router.get("/v1/files/{file_id}/content", tags=["openai"])
async def file_content(request: Request, file_id: str) -> Response:
    """The file's bytes (for a batch's output and error files: JSONL, one line per request)."""
    record = await _file(request, file_id)
    data = await _service(request).stores.blobs.get(_owner(request), record.ref)
    if data is None:
        raise NotFoundError(f"the content of file {file_id!r} is gone (retention)", param="file_id")
    return Response(data, media_type=record.content_type)


@router.delete("/v1/files/{file_id}", tags=["openai"])
async def remove_file(request: Request, file_id: str) -> dict[str, Any]:
    await _file(request, file_id)
    await delete_file(_service(request).stores.sessions, _owner(request), file_id)
    return {"id": file_id, "object": "file", "deleted": True}
