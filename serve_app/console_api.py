"""Two read-only routes the web console needs beyond the task API, both under the caller's key like the rest:
``GET /v1/files/{ref}`` (a file this key uploaded or one of its tasks stored: OS-agent screenshots, an uploaded
video to seek in) and ``GET /v1/tasks/{id}/pages/{n}`` (one page of a task's input PDF rendered to PNG with
PyMuPDF, for reviewing citations beside the page). Rendering is bounded: page size in pixels, two renders
at a time (a busy renderer answers 503), and a timeout."""

from __future__ import annotations

import asyncio
import base64
import binascii
import threading
from typing import Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from connectors.errors import ClientInputError
from serve_app.state import ApiError
from serve_app.task_service import TaskService
from serve_app.tasks_api import Service, _owner

router = APIRouter()

MAX_PAGE_PIXELS = 2400 * 3200  # a width-2000 render of a very tall page is scaled down to this area
RENDER_TIMEOUT_S = 30.0
_render_slots = threading.BoundedSemaphore(2)  # threads: the app may serve from several event loops
def _not_found(message: str, param: str) -> ClientInputError:
    return ClientInputError(message, status_code=404, code="not_found", param=param)


async def _task_pdf(request: Request, service: TaskService, task_id: str) -> tuple[bytes, str | None]:
    """The task's input PDF (uploaded blob or inline file); for a URL input, its annotated PDF artifact."""
    owner = _owner(request)
    task = await service.get(owner, task_id)  # 404 for a missing or foreign task
    source: dict[str, Any] = task.get("input") or {}
    password = source.get("password") if isinstance(source.get("password"), str) else None
    data: bytes | None = None
    if isinstance(source.get("blob"), str):
        data = await service.stores.blobs.get(owner, source["blob"])
    elif isinstance(source.get("file"), dict) and isinstance(source["file"].get("data"), str):
        try:
            data = base64.b64decode(source["file"]["data"], validate=True)
        except (binascii.Error, ValueError):
            data = None
    else:
        artifacts = (task.get("result") or {}).get("artifacts") if isinstance(task.get("result"), dict) else None
        entry = (artifacts or {}).get("annotated_pdf")
        if isinstance(entry, dict) and isinstance(entry.get("ref"), str):
            data = await service.stores.blobs.get(owner, entry["ref"])
    if data is None:
        raise _not_found(f"task {task_id!r} has no PDF to show (its input is gone or was not a file)", "task_id")
    return data, password


def render_page(data: bytes, page: int, width: int, password: str | None) -> tuple[bytes, float, float, int]:
    """PNG of page ``page`` (1-based) ``width`` pixels wide (less for a page that would exceed the pixel
    budget), with the page's size in PDF points and the page count."""
    if not _render_slots.acquire(timeout=RENDER_TIMEOUT_S / 2):  # waiting threads would starve the pool
        raise ApiError(503, "overloaded", "page rendering is busy; retry shortly", {"Retry-After": "2"})
    try:
        return _render(data, page, width, password)
    finally:
        _render_slots.release()


def _render(data: bytes, page: int, width: int, password: str | None) -> tuple[bytes, float, float, int]:
    import pymupdf

    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except Exception:
        raise ClientInputError("the task's input is not a readable PDF", status_code=422, code="not_a_pdf",
                               param="task_id") from None
    with doc:
        if doc.needs_pass and not (password and doc.authenticate(password)):
            raise ClientInputError("the task's PDF is encrypted", status_code=422, code="encrypted_pdf",
                                   param="task_id")
        if not 1 <= page <= doc.page_count:
            raise _not_found(f"page {page} out of range (the PDF has {doc.page_count} pages)", "page")
        pdf_page = doc[page - 1]
        rect = pdf_page.rect
        zoom = width / max(rect.width, 1.0)
        area = rect.width * rect.height * zoom * zoom
        if area > MAX_PAGE_PIXELS:
            zoom *= (MAX_PAGE_PIXELS / area) ** 0.5
        pixmap = pdf_page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
        return pixmap.tobytes("png"), rect.width, rect.height, doc.page_count


@router.get("/v1/tasks/{task_id}/pages/{page}", tags=["tasks"])
async def page_image(request: Request, service: Service, task_id: str, page: int = Path(..., ge=1, le=100_000),
                     width: int = Query(1000, ge=100, le=2000)) -> Response:
    """Page ``page`` (1-based) of the task's input PDF as a PNG ``width`` pixels wide. Headers ``X-Page-Width``
    and ``X-Page-Height`` give the page's size in PDF points (citation boxes are in points), ``X-Page-Count``
    the number of pages."""
    data, password = await _task_pdf(request, service, task_id)
    png, w, h, count = await asyncio.wait_for(asyncio.to_thread(render_page, data, page, width, password),
                                              RENDER_TIMEOUT_S)
    return Response(png, media_type="image/png", headers={
        "X-Page-Width": f"{w:.2f}", "X-Page-Height": f"{h:.2f}", "X-Page-Count": str(count),
        "Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})
