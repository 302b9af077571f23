"""REST for tasks and sessions on the ingress: ``/v1/tasks`` (submit, get, list, cancel, SSE events) and
``/v1/sessions``.

Submission validates everything a runner would later trip over - the task type is registered, the input matches
the agent's schema, a named session exists for this key - so bad input is a 4xx now, never a failed task later.
Every record belongs to the caller's API key; another key's id answers 404 exactly like a missing one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from agents.messages import session_growth, storable
from connectors.dicom import DicomError, deidentified_bytes, is_dicom
from connectors.errors import ClientInputError
from connectors.stores.base import TERMINAL_STATUSES, TaskEvent, TaskSubmission
from serve_app.auth import RateLimited
from serve_app.openai_files import create_openai_file
from serve_app.state import IngressState, app_state, rate_limited
from serve_app.task_service import NotFoundError, TaskService

router = APIRouter()


def task_service(state: Annotated[IngressState, Depends(app_state)]) -> TaskService:
    """The task/session service of the app's state (a FastAPI dependency; opened on first use)."""
    return state.tasks()


Service = Annotated[TaskService, Depends(task_service)]


def _owner(request: Request) -> str:
    return getattr(request.state, "key_id", None) or "anonymous"


async def _admit_create(request: Request) -> None:
    """Per-key budget for requests that store something (task, file, session): 429 with Retry-After past it
    (cluster-wide when the stores are on Redis: ``serve_app.cluster_limits``)."""
    state = app_state(request)
    try:
        await (await state.create_limiter.admit(_owner(request))).__aexit__(None, None, None)
    except RateLimited as exc:
        raise rate_limited(exc, "too many tasks, files or sessions created with this API key "
                           f"(limit {state.config.auth.creates_per_minute} per minute)") from None


def _task_json(task: dict[str, Any], created: bool | None = None) -> dict[str, Any]:
    out = {"object": "task", **task}
    if created is not None:
        out["created"] = created
    return out


@router.post("/v1/tasks", status_code=202, tags=["tasks"])
async def submit_task(request: Request, service: Service, body: TaskSubmission) -> JSONResponse:
    """Accept a task (202) or, for an idempotency key seen before, return the existing one (200)."""
    await _admit_create(request)
    task, created = await service.submit(_owner(request), body)
    return JSONResponse(_task_json(task, created), status_code=202 if created else 200,
                        headers={"Location": f"/v1/tasks/{task['id']}"})


@router.get("/v1/tasks", tags=["tasks"])
async def list_tasks(
    request: Request,
    service: Service,
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    type: str | None = Query(None, max_length=64),
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, max_length=500),
) -> dict[str, Any]:
    try:
        page = await service.stores.tasks.list(_owner(request), status=status, type=type, limit=limit,
                                               cursor=cursor)
    except ValueError as exc:
        raise ClientInputError(f"bad cursor: {exc}", param="cursor") from None
    return {"object": "list", "data": [_task_json(t.public()) for t in page.tasks], "next_cursor": page.next_cursor}


@router.get("/v1/task-types", tags=["tasks"])
async def task_types(request: Request, service: Service) -> dict[str, Any]:
    """The task types this service runs, with their input JSON schemas."""
    return {"object": "list", "data": service.registry.describe()}


@router.get("/v1/tasks/{task_id}", tags=["tasks"])
async def get_task(request: Request, service: Service, task_id: str) -> dict[str, Any]:
    return _task_json(await service.get(_owner(request), task_id))


@router.post("/v1/tasks/{task_id}/cancel", tags=["tasks"])
async def cancel_task(request: Request, service: Service, task_id: str) -> dict[str, Any]:
    """Queued tasks end at once; running ones at the agent's next step; ended ones are unchanged."""
    record = await service.stores.tasks.cancel(task_id, _owner(request))
    if record is None:
        raise NotFoundError(f"task {task_id!r} not found", param="task_id")
    return _task_json(record.public())


class Confirmation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(..., ge=0, description="the step of the confirmation_required event")
    approve: bool


@router.post("/v1/tasks/{task_id}/confirm", tags=["tasks"])
async def confirm_action(request: Request, service: Service, task_id: str, body: Confirmation) -> dict[str, Any]:
    """Approve or decline a risky action a running agent is waiting on (event ``confirmation_required``)."""
    owner = _owner(request)
    task = await service.get(owner, task_id)
    if task["status"] not in ("queued", "running") or not task.get("session_id"):
        raise ClientInputError(f"task {task_id!r} is {task['status']}, not waiting for a confirmation",
                               status_code=409, code="conflict", param="task_id")
    await service.stores.sessions.set_partial(task["session_id"], owner, f"confirm.{body.step}", body.approve)
    return {"object": "confirmation", "task_id": task_id, "step": body.step, "approve": body.approve}


class UserReply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: int = Field(..., ge=0, description="the step of the input_required event")
    text: str = Field(..., min_length=1, max_length=4000, description="the answer to the agent's question")


@router.post("/v1/tasks/{task_id}/reply", tags=["tasks"])
async def reply_to_task(request: Request, service: Service, task_id: str, body: UserReply) -> dict[str, Any]:
    """Answer the question a running agent asked (event ``input_required``, an OS agent's ``call_user``); the
    answer goes into the agent's next step. The first answer to a step counts."""
    owner = _owner(request)
    task = await service.get(owner, task_id)
    if task["status"] not in ("queued", "running") or not task.get("session_id"):
        raise ClientInputError(f"task {task_id!r} is {task['status']}, not waiting for a reply",
                               status_code=409, code="conflict", param="task_id")
    await service.stores.sessions.set_partial(task["session_id"], owner, f"reply.{body.step}", body.text)
    return {"object": "task.reply", "task_id": task_id, "step": body.step}


def _sse(event: TaskEvent) -> bytes:
    return f"id: {event.id}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n".encode()


def _ends_task(event: TaskEvent) -> bool:
    return event.type == "status" and event.data.get("status") in TERMINAL_STATUSES


@router.get("/v1/tasks/{task_id}/events", tags=["tasks"])
async def task_events(request: Request, service: Service, task_id: str,
                      after: int | None = Query(None, ge=0)) -> StreamingResponse:
    """Server-sent events, ``id:`` = the event's number. Resume with ``Last-Event-ID`` (or ``?after=N``): only
    later events are sent, none is missed. The stream ends after the event that ends the task."""
    await service.get(_owner(request), task_id)  # 404 for a missing or foreign task
    header = request.headers.get("last-event-id")
    if header is not None and not header.strip().isdigit():
        raise ClientInputError("Last-Event-ID must be an event number", param="Last-Event-ID")
    cursor = int(header) if header is not None else (after or 0)
    tasks = service.stores.tasks
    keepalive = service.config.sse_keepalive_s

    async def stream() -> AsyncIterator[bytes]:
        position = cursor
        yield b"retry: 1000\n\n"
        while True:
            record = await tasks.get(task_id, None)
            if record is None:
                return  # purged
            if record.status in TERMINAL_STATUSES and record.last_event_id <= position:
                return
            events = await tasks.wait_events(task_id, position, timeout_s=keepalive)
            if not events:
                if await request.is_disconnected():
                    return
                yield b": keepalive\n\n"
                continue
            for event in events:
                yield _sse(event)
                position = event.id
                if _ends_task(event):
                    return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/v1/tasks/{task_id}/artifacts/{name}", tags=["tasks"])
async def task_artifact(request: Request, service: Service, task_id: str, name: str) -> Response:
    """A file the task produced (e.g. ``annotated_pdf``, ``summary_md``), listed in ``result.artifacts``."""
    task = await service.get(_owner(request), task_id)
    artifacts = (task.get("result") or {}).get("artifacts") if isinstance(task.get("result"), dict) else None
    entry = (artifacts or {}).get(name)
    if not isinstance(entry, dict) or "ref" not in entry:
        raise NotFoundError(f"task {task_id!r} has no artifact {name!r}", param="name")
    data = await service.stores.blobs.get(_owner(request), entry["ref"])
    if data is None:
        raise NotFoundError(f"artifact {name!r} of task {task_id!r} is gone (retention)", param="name")
    filename = str(entry.get("filename") or name).replace('"', "")
    return Response(data, media_type=entry.get("content_type") or "application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.post("/v1/files", status_code=201, tags=["tasks"])
async def upload_file(request: Request, service: Service) -> JSONResponse:
    """Upload a file (the raw request body, any content type) for a task to use by reference (``blob``): large
    PDFs need not travel base64-encoded inside the task's JSON. Limited by ``limits.max_body_bytes``.
    A ``multipart/form-data`` body with ``purpose`` is the OpenAI Files API (``serve_app.openai_files``)."""
    await _admit_create(request)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await create_openai_file(request, service, _owner(request))
    data = await request.body()
    if not data:
        raise ClientInputError("empty body: send the file's bytes as the request body", param="body")
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    extra: dict[str, Any] = {}
    if is_dicom(data):  # patient data never reaches the store: identifying tags are stripped on arrival
        try:
            data, removed = await asyncio.to_thread(deidentified_bytes, data)
        except DicomError as exc:
            raise ClientInputError(exc.message, code=exc.code, param="body") from None
        extra["deidentified"] = {"removed_tags": removed}
    ref = await service.stores.blobs.put(_owner(request), data, content_type)
    return JSONResponse({"object": "file", **ref.model_dump(), **extra}, status_code=201)


# ----------------------------------------------------------------------------------------------- sessions


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, Any] = Field(default_factory=dict)
    ttl_s: float | None = Field(None, gt=0, le=365 * 24 * 3600.0)


def _session_json(record: Any) -> dict[str, Any]:
    return {"object": "session", **record.public()}


async def _session(request: Request, service: TaskService, session_id: str) -> Any:
    record = await service.stores.sessions.get(session_id, _owner(request))
    if record is None:
        raise NotFoundError(f"session {session_id!r} not found", param="session_id")
    return record


@router.post("/v1/sessions", status_code=201, tags=["sessions"])
async def create_session(request: Request, service: Service, body: SessionCreate | None = None) -> JSONResponse:
    await _admit_create(request)
    body = body or SessionCreate()
    record = await service.stores.sessions.create(
        _owner(request), metadata=body.metadata, ttl_s=body.ttl_s or service.config.session_ttl_s)
    return JSONResponse(_session_json(record), status_code=201)


@router.get("/v1/sessions/{session_id}", tags=["sessions"])
async def get_session(request: Request, service: Service, session_id: str) -> dict[str, Any]:
    return _session_json(await _session(request, service, session_id))


@router.get("/v1/sessions/{session_id}/messages", tags=["sessions"])
async def session_messages(request: Request, service: Service, session_id: str, start: int = Query(0, ge=0),
                           end: int | None = Query(None, ge=0)) -> dict[str, Any]:
    """Stored messages; media parts appear as ``blob_ref`` parts (not inlined)."""
    await _session(request, service, session_id)
    messages = await service.stores.sessions.messages(session_id, _owner(request), start=start, end=end)
    return {"object": "list", "data": [m.model_dump(mode="json") for m in messages]}


@router.get("/v1/sessions/{session_id}/children", tags=["sessions"])
async def session_children(request: Request, service: Service, session_id: str) -> dict[str, Any]:
    await _session(request, service, session_id)
    children = await service.stores.sessions.children(session_id, _owner(request))
    return {"object": "list", "data": [_session_json(c) for c in children]}


@router.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"])
async def delete_session(request: Request, service: Service, session_id: str) -> Response:
    await _session(request, service, session_id)
    await service.stores.sessions.delete(session_id, _owner(request))
    return Response(status_code=204)


# ------------------------------------------------------------------------------- chat with a session


async def session_history(service: TaskService, owner: str, session_id: str) -> list[dict[str, Any]]:
    if await service.stores.sessions.get(session_id, owner) is None:
        raise NotFoundError(f"session {session_id!r} not found", param="session_id")
    stored = await service.stores.sessions.messages(session_id, owner, resolve_media=True)
    return [{"role": m.role, "content": m.content} for m in stored]


async def remember_turn(service: TaskService, owner: str, session_id: str, new_messages: list[dict[str, Any]],
                        reply_text: str, usage: Any) -> None:
    """Append the turn's new messages and the reply; the session's token count becomes the conversation's."""
    grown = await session_growth(service.stores.sessions, session_id, owner, usage)
    await service.stores.sessions.append(
        session_id, owner, storable(new_messages) + [{"role": "assistant", "content": reply_text}],
        token_count=grown)

