"""OpenAI ``files.create`` (multipart ``file`` + ``purpose``): ``POST /v1/files`` with a multipart body lands here
(``tasks_api.upload_file`` hands it over, after the per-key creation budget); a raw body keeps the task API's blob
upload. ``retrieve`` / ``content`` / ``delete`` are routes in ``serve_app.files_api``.

A ``purpose="batch"`` file is checked line by line at upload, so a malformed line is a 400 naming it before any
batch exists. Records live in the session store (``connectors.stores.files``).
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse

from agents.batch import BatchFileError, parse_batch_jsonl
from connectors.dicom import DicomError, deidentified_bytes, is_dicom
from connectors.errors import ClientInputError
from connectors.stores.files import FILE_TTL_S, create_file
from serve_app.task_service import TaskService

PURPOSES = ("batch", "user_data", "vision", "assistants", "fine-tune", "evals")


def batch_file_error(exc: BatchFileError, param: str = "file") -> ClientInputError:
    """The 400 for a malformed batch input file: the message names the line; ``param`` is ``file`` (upload) or
    ``input_file_id`` (batch creation)."""
    return ClientInputError(f"invalid batch input file: {exc}", status_code=400, code="invalid_batch_file",
                            param=param)


async def create_openai_file(request: Request, service: TaskService, owner: str) -> JSONResponse:
    """``multipart/form-data`` with ``file`` and ``purpose`` (what the official client sends)."""
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
    filename = (upload.filename or "upload")[:255]
    if is_dicom(data):  # patient data never reaches the store (nor does a file name that often carries it)
        try:
            data, _ = await asyncio.to_thread(deidentified_bytes, data)
        except DicomError as exc:
            raise ClientInputError(exc.message, code=exc.code, param="file") from None
        filename = "image.dcm"
    if purpose == "batch":
        try:
            await asyncio.to_thread(parse_batch_jsonl, data)  # 50,000 lines: off the event loop
        except BatchFileError as exc:
            raise batch_file_error(exc) from None
    record = await create_file(service.stores.sessions, service.stores.blobs, owner, data,
                               filename=filename, purpose=purpose,
                               content_type=upload.content_type or "application/octet-stream", ttl_s=FILE_TTL_S)
    return JSONResponse(record.public(), status_code=201)  # the route's status; the official client takes any 2xx
