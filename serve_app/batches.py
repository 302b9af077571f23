"""OpenAI Batch API (``/v1/batches``) as a view of durable ``openai_batch`` tasks (``agents.batch``).

A batch id is its task id with another prefix (``batch_<hex>`` <-> ``task_<hex>``), so the batch object is
computed from the task record on every read and nothing else is stored. Status mapping:

    queued -> validating; running -> in_progress (finalizing once the agent writes the files; cancelling after
    a cancel); succeeded -> completed; failed -> failed (expired when the completion window ran out);
    cancelled -> cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from agents.batch import FILES_PARTIAL, BatchFileError, parse_batch_jsonl, parse_counts
from connectors.stores.base import TaskRecord, TaskSubmission
from connectors.stores.files import get_file
from connectors.errors import ClientInputError
from serve_app.openai_files import batch_file_error
from serve_app.state import app_state
from serve_app.task_service import NotFoundError
from serve_app.tasks_api import Service, _admit_create, _owner

router = APIRouter()
BATCH_TYPE = "openai_batch"


class BatchCreate(BaseModel):
    """``client.batches.create(...)``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(..., min_length=1, max_length=200)
    endpoint: Literal["/v1/chat/completions"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(None, max_length=16)
    output_expires_after: dict[str, Any] | None = None  # accepted; output files follow the file retention


def batch_id_of(task_id: str) -> str:
    return "batch_" + task_id.removeprefix("task_")


def task_id_of(batch_id: str) -> str | None:
    return "task_" + batch_id.removeprefix("batch_") if batch_id.startswith("batch_") else None


def _ts(value: float | None) -> int | None:
    return int(value) if value is not None else None


async def batch_object(service: Any, task: TaskRecord) -> dict[str, Any]:
    """The OpenAI ``batch`` object for ``task``."""
    inp = task.input
    progress = task.progress
    counts = parse_counts(progress.message if progress else None) or (0, 0)
    total = int(progress.total) if progress and progress.total is not None else 0
    finalizing = bool(progress and "finalizing" in progress.message)
    status = {"queued": "validating", "running": "in_progress", "succeeded": "completed", "failed": "failed",
              "cancelled": "cancelled"}[task.status]
    if task.status == "running" and finalizing:
        status = "finalizing"
    if task.status in ("queued", "running") and task.cancel_requested:
        status = "cancelling"
    if task.status == "failed" and task.error is not None and task.error.code == "batch_expired":
        status = "expired"
    files: dict[str, Any] = {}
    if isinstance(task.result, dict):
        files = task.result
    elif task.status in ("cancelled", "failed") and task.session_id:
        try:
            files = (await service.stores.sessions.partials(task.session_id, task.owner)).get(FILES_PARTIAL) or {}
        except Exception:  # the session expired: no files to point at
            files = {}
    errors = None
    if task.status == "failed" and status != "expired" and task.error is not None:
        errors = {"object": "list", "data": [{"code": task.error.code, "message": task.error.message,
                                              "param": None, "line": None}]}
    ended = _ts(task.finished_at)
    created = float(inp.get("created_at") or task.created_at)
    return {
        "id": batch_id_of(task.id),
        "object": "batch",
        "endpoint": inp.get("endpoint", "/v1/chat/completions"),
        "errors": errors,
        "input_file_id": inp.get("input_file_id"),
        "completion_window": inp.get("completion_window", "24h"),
        "status": status,
        "output_file_id": files.get("output_file_id"),
        "error_file_id": files.get("error_file_id"),
        "created_at": int(created),
        "in_progress_at": _ts(task.started_at),
        "expires_at": int(created + 24 * 3600),
        "finalizing_at": _ts(task.updated_at) if status == "finalizing" else (
            ended if status in ("completed",) else None),
        "completed_at": ended if status == "completed" else None,
        "failed_at": ended if status == "failed" else None,
        "expired_at": ended if status == "expired" else None,
        "cancelling_at": _ts(task.updated_at) if task.cancel_requested else None,
        "cancelled_at": ended if status == "cancelled" else None,
        "request_counts": {"total": total, "completed": counts[0], "failed": counts[1]},
        "metadata": inp.get("metadata"),
        "model": inp.get("model"),
    }


async def _task(request: Request, service: Any, batch_id: str) -> TaskRecord:
    task_id = task_id_of(batch_id)
    record = await service.stores.tasks.get(task_id, _owner(request)) if task_id else None
    if record is None or record.type != BATCH_TYPE:
        raise NotFoundError(f"batch {batch_id!r} not found", param="batch_id")
    return record


@router.post("/v1/batches", tags=["openai"])
async def create_batch(request: Request, service: Service, body: BatchCreate) -> JSONResponse:
    """Create a batch from an uploaded ``purpose="batch"`` file; it runs as a durable task."""
    await _admit_create(request)
    owner = _owner(request)
    record = await get_file(service.stores.sessions, owner, body.input_file_id)
    if record is None:
        raise NotFoundError(f"file {body.input_file_id!r} not found", param="input_file_id")
    if record.purpose != "batch":
        raise ClientInputError(f"file {body.input_file_id!r} has purpose {record.purpose!r}, not 'batch'",
                               param="input_file_id")
    data = await service.stores.blobs.get(owner, record.ref)
    if data is None:
        raise NotFoundError(f"the content of file {body.input_file_id!r} is gone (retention)",
                            param="input_file_id")
    try:
        await asyncio.to_thread(parse_batch_jsonl, data, endpoint=body.endpoint)
    except BatchFileError as exc:
        raise batch_file_error(exc, param="input_file_id") from None
    state = app_state(request)
    submission = TaskSubmission(type=BATCH_TYPE, input={
        "input_file_id": body.input_file_id, "endpoint": body.endpoint,
        "completion_window": body.completion_window, "metadata": body.metadata, "created_at": time.time(),
        "model": state.config.model.served_name})
    task, _created = await service.submit(owner, submission)
    stored = await service.stores.tasks.get(task["id"], owner)
    return JSONResponse(await batch_object(service, stored), status_code=200,
                        headers={"Location": f"/v1/batches/{batch_id_of(task['id'])}"})


@router.get("/v1/batches/{batch_id}", tags=["openai"])
async def retrieve_batch(request: Request, service: Service, batch_id: str) -> dict[str, Any]:
    return await batch_object(service, await _task(request, service, batch_id))


@router.post("/v1/batches/{batch_id}/cancel", tags=["openai"])
async def cancel_batch(request: Request, service: Service, batch_id: str) -> dict[str, Any]:
    """The batch becomes ``cancelling`` and then ``cancelled``; requests already finished stay in its files."""
    task = await _task(request, service, batch_id)
    record = await service.stores.tasks.cancel(task.id, _owner(request))
    return await batch_object(service, record or task)


def _cursor_after(task: TaskRecord) -> str:
    """The task list's cursor that continues after ``task`` (both stores page by (created_at, id))."""
    return base64.urlsafe_b64encode(json.dumps([task.created_at, task.id]).encode()).decode()


@router.get("/v1/batches", tags=["openai"])
async def list_batches(request: Request, service: Service, after: str | None = Query(None, max_length=200),
                       limit: int = Query(20, ge=1, le=100)) -> dict[str, Any]:
    """Newest first; ``after`` = the last batch id of the previous page (what the official client sends)."""
    cursor = _cursor_after(await _task(request, service, after)) if after else None
    page = await service.stores.tasks.list(_owner(request), type=BATCH_TYPE, limit=limit, cursor=cursor)
    data = [await batch_object(service, t) for t in page.tasks]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": page.next_cursor is not None}
