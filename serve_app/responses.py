"""OpenAI Responses API (``/v1/responses``): create (plain, streamed, background), retrieve, cancel, delete and
``input_items``, compatible with the official client.

Stored responses and their chains live in the session store (``agents.responses``), so any replica continues a
``previous_response_id`` chain and it survives restarts. ``background=true`` submits an ``openai_response``
task (leases, retries, cancellation); its status is read from the task. Streams carry the Responses SSE events
(``response.created`` … ``response.completed``) with ``sequence_number`` counting from 0.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from agents.responses import (
    RESPONSE_TYPE,
    Chain,
    ResponseCreate,
    ResponsesInputError,
    chat_body,
    check_supported,
    input_items,
    load_chain,
    message_item,
    new_response_id,
    open_response,
    output_items,
    reasoning_item,
    record_turn,
    response_object,
    stored_response,
    to_engine_request,
)
from connectors.stores.base import TERMINAL_STATUSES, TaskSubmission
from engine.runtime.request import Delta
from connectors.errors import ClientInputError
from serve_app.auth import RateLimited
from serve_app.state import ApiError, app_state, rate_limited
from serve_app.task_service import NotFoundError, TaskService
from serve_app.tasks_api import _admit_create, _owner

router = APIRouter()
SESSION_HEADER = "x-session-id"


def _service(request: Request) -> TaskService:
    return app_state(request).tasks()


def _stream_error(exc: BaseException) -> dict[str, str]:
    """The ``error`` of a ``response.failed`` event (a stream has no status code left to use)."""
    if isinstance(exc, ClientInputError):
        return {"code": exc.code, "message": exc.message}
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return {"code": "timeout", "message": "the response took longer than the server's timeout"}
    return {"code": "server_error", "message": f"generation failed ({type(exc).__name__})"}


def routing_session(request: Request) -> str | None:
    """The ``x-session-id`` header (the convention of LLM routers): requests with one prefer one replica."""
    value = request.headers.get(SESSION_HEADER)
    if value is None:
        return None
    value = value.strip()
    if not value or len(value) > 200:
        raise ResponsesInputError(f"{SESSION_HEADER} must be 1 to 200 characters", param=SESSION_HEADER)
    return value


class EventStream:
    """Numbers the events of one response stream (``sequence_number`` from 0) and formats them as SSE."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, type_: str, **fields: Any) -> bytes:
        payload = {"type": type_, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {type_}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _final_event(obj: dict[str, Any]) -> str:
    return {"completed": "response.completed", "incomplete": "response.incomplete"}.get(obj["status"],
                                                                                         "response.failed")


def item_events(emit: EventStream, output: list[dict[str, Any]]) -> list[bytes]:
    """The events that build ``output`` (finished items) in one go: for a background response's stream."""
    events: list[bytes] = []
    for index, item in enumerate(output):
        if item["type"] == "reasoning":
            text = "".join(p.get("text", "") for p in item.get("content", []))
            events.append(emit("response.output_item.added", output_index=index,
                               item=reasoning_item(item["id"], "", "in_progress")))
            if text:
                events.append(emit("response.reasoning_text.delta", item_id=item["id"], output_index=index,
                                   content_index=0, delta=text))
                events.append(emit("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=text))
            events.append(emit("response.output_item.done", output_index=index, item=item))
        elif item["type"] == "message":
            part = item["content"][0] if item["content"] else {"type": "output_text", "text": "", "annotations": []}
            events.append(emit("response.output_item.added", output_index=index,
                               item=message_item(item["id"], None, "in_progress")))
            events.append(emit("response.content_part.added", item_id=item["id"], output_index=index,
                               content_index=0, part={**part, "text": ""}))
            if part["text"]:
                events.append(emit("response.output_text.delta", item_id=item["id"], output_index=index,
                                   content_index=0, delta=part["text"], logprobs=[]))
            events.append(emit("response.output_text.done", item_id=item["id"], output_index=index,
                               content_index=0, text=part["text"], logprobs=[]))
            events.append(emit("response.content_part.done", item_id=item["id"], output_index=index,
                               content_index=0, part=part))
            events.append(emit("response.output_item.done", output_index=index, item=item))
    return events


# ----------------------------------------------------------------------------------------------------- create


@router.post("/v1/responses", tags=["openai"])
async def create_response(request: Request, body: ResponseCreate) -> Any:
    """Create a model response. ``previous_response_id`` continues a stored conversation; ``background=true``
    runs it as a durable task (poll ``GET /v1/responses/{id}``); ``stream=true`` sends Responses SSE events."""
    check_supported(body)
    state = app_state(request)
    owner = _owner(request)
    header_session = routing_session(request)
    served = state.config.model.served_name
    needs_store = body.store or body.previous_response_id is not None
    service = state.tasks() if needs_store else None
    chain = Chain()
    if body.previous_response_id is not None:
        chain = await load_chain(service.stores.sessions, owner, body.previous_response_id)
    response_id = new_response_id()
    if body.background:
        return await _start_background(request, service, owner, body, chain, response_id, served)

    try:
        slot = await state.limiter.admit(owner)
        await slot.__aenter__()
    except RateLimited as exc:
        raise rate_limited(exc, "too many requests for this API key") from None
    handed_off = False

    async def release() -> None:
        await slot.__aexit__(None, None, None)

    try:
        # errors propagate to the ingress middleware, which answers them like chat completions' (4xx, 503, 504)
        generate_request, n_instructions = await asyncio.wait_for(
            to_engine_request(body, served, response_id, state.config.limits),
            state.config.limits.url_fetch_timeout_s * 2)
        messages = list(generate_request.messages or [])
        own = messages[n_instructions:]
        generate_request = generate_request.model_copy(update={
            "messages": messages[:n_instructions] + chain.history + own,
            "session_id": header_session or chain.root or response_id})
        created = time.time()
        model = body.model or served
        if body.stream:
            events = _stream(state, service, owner, body, chain, response_id, generate_request, own, created, model,
                             release)
            handed_off = True
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": response_id})
        deltas = await asyncio.wait_for(state.backend.complete(generate_request), state.config.request_timeout_s)
        if not deltas or deltas[-1].finish_reason == "error":
            raise ApiError(500, "generation_failed", (deltas[-1].error if deltas else None) or "generation failed")
        final = deltas[-1]
        text = "".join(d.text for d in deltas)
        reasoning = "".join(d.reasoning_text for d in deltas)
        obj = response_object(body, response_id=response_id, model=model, status="completed", created_at=created,
                              output=output_items(text, reasoning), usage=final.usage,
                              finish_reason=final.finish_reason)
        if final.usage is not None:
            state.metrics.tokens(final.usage.prompt_tokens, final.usage.completion_tokens)
        if body.store:
            await _store(service, owner, body, chain, response_id, obj, own, text)
        return JSONResponse(obj, headers={"X-Request-Id": response_id})
    finally:
        if not handed_off:
            await release()


async def _store(service: Any, owner: str, body: ResponseCreate, chain: Chain, response_id: str,
                 obj: dict[str, Any], own: list[dict[str, Any]], text: str) -> None:
    ttl = service.config.session_ttl_s
    await open_response(service.stores.sessions, owner, body, response_id, chain, obj, ttl)
    await record_turn(service.stores.sessions, owner, response_id, own, text, obj)


async def _start_background(request: Request, service: Any, owner: str, body: ResponseCreate, chain: Chain,
                            response_id: str, served: str) -> Any:
    from serve_app.openai_api import ChatCompletionRequest

    await _admit_create(request)
    try:  # shape errors now (400), not as a failed task later; media are fetched when it runs
        ChatCompletionRequest.model_validate(chat_body(body, served))
    except ResponsesInputError:
        raise
    except Exception as exc:
        raise ResponsesInputError(str(exc).splitlines()[0][:500], param="input") from None
    obj = response_object(body, response_id=response_id, model=body.model or served, status="queued")
    await open_response(service.stores.sessions, owner, body, response_id, chain, obj, service.config.session_ttl_s)
    task, _ = await service.submit(owner, TaskSubmission(
        type=RESPONSE_TYPE, input={"response_id": response_id, "served_name": served},
        options={"session_id": response_id}))
    await service.stores.sessions.update_metadata(response_id, owner, {"task_id": task["id"]})
    if body.stream:
        return StreamingResponse(_background_events(service, owner, response_id, -1), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return JSONResponse(obj)


async def _stream(state: Any, service: Any, owner: str, body: ResponseCreate, chain: Chain, response_id: str,
                  generate_request: Any, own: list[dict[str, Any]], created: float, model: str,
                  release: Any) -> AsyncIterator[bytes]:
    """Foreground stream: created, in_progress, then per output item added / deltas / done, then completed."""
    emit = EventStream()
    start = response_object(body, response_id=response_id, model=model, status="in_progress", created_at=created)
    reasoning_id, message_id = f"rs_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    reasoning: list[str] = []
    text: list[str] = []
    output: list[dict[str, Any]] = []
    state_ = {"reasoning_open": False, "message_open": False}
    deadline = time.monotonic() + state.config.request_timeout_s

    def close_reasoning() -> list[bytes]:
        state_["reasoning_open"] = False
        full = "".join(reasoning)
        item = reasoning_item(reasoning_id, full)
        output.append(item)
        return [emit("response.reasoning_text.done", item_id=reasoning_id, output_index=0, content_index=0,
                     text=full), emit("response.output_item.done", output_index=0, item=item)]

    def open_message() -> list[bytes]:
        state_["message_open"] = True
        index = len(output)
        return [emit("response.output_item.added", output_index=index, item=message_item(message_id, None,
                                                                                           "in_progress")),
                emit("response.content_part.added", item_id=message_id, output_index=index, content_index=0,
                     part={"type": "output_text", "text": "", "annotations": []})]

    stream = state.backend.generate(generate_request)
    try:
        yield emit("response.created", response=start)
        yield emit("response.in_progress", response=start)
        final: Delta | None = None
        while True:
            try:
                delta = await asyncio.wait_for(stream.__anext__(), max(0.001, deadline - time.monotonic()))
            except StopAsyncIteration:
                break
            except Exception as exc:
                yield emit("response.failed", response={**start, "status": "failed", "error": _stream_error(exc)})
                return
            if delta.reasoning_text:
                if not state_["reasoning_open"] and not output and not state_["message_open"]:
                    state_["reasoning_open"] = True
                    yield emit("response.output_item.added", output_index=0,
                               item=reasoning_item(reasoning_id, "", "in_progress"))
                if state_["reasoning_open"]:
                    reasoning.append(delta.reasoning_text)
                    yield emit("response.reasoning_text.delta", item_id=reasoning_id, output_index=0,
                               content_index=0, delta=delta.reasoning_text)
            if delta.text:
                if state_["reasoning_open"]:
                    for event in close_reasoning():
                        yield event
                if not state_["message_open"]:
                    for event in open_message():
                        yield event
                text.append(delta.text)
                yield emit("response.output_text.delta", item_id=message_id, output_index=len(output),
                           content_index=0, delta=delta.text, logprobs=[])
            if delta.finish_reason is not None:
                final = delta
                break
        if final is None or final.finish_reason == "error":
            message = (final.error if final else None) or "generation failed"
            yield emit("response.failed", response={**start, "status": "failed",
                                                    "error": {"code": "server_error", "message": message}})
            return
        if state_["reasoning_open"]:
            for event in close_reasoning():
                yield event
        if not state_["message_open"]:
            for event in open_message():
                yield event
        full = "".join(text)
        index = len(output)
        item = message_item(message_id, full)
        output.append(item)
        part = item["content"][0]
        yield emit("response.output_text.done", item_id=message_id, output_index=index, content_index=0, text=full,
                   logprobs=[])
        yield emit("response.content_part.done", item_id=message_id, output_index=index, content_index=0, part=part)
        yield emit("response.output_item.done", output_index=index, item=item)
        obj = response_object(body, response_id=response_id, model=model, status="completed", created_at=created,
                              output=output, usage=final.usage, finish_reason=final.finish_reason)
        if final.usage is not None:
            state.metrics.tokens(final.usage.prompt_tokens, final.usage.completion_tokens)
        if body.store:
            await _store(service, owner, body, chain, response_id, obj, own, full)
        yield emit(_final_event(obj), response=obj)
    finally:
        await stream.aclose()
        await release()


# ------------------------------------------------------------------------------------------ read, list, delete


async def _session(request: Request, response_id: str) -> Any:
    session = await stored_response(_service(request).stores.sessions, _owner(request), response_id)
    if session is None:
        raise NotFoundError(f"response {response_id!r} not found", param="response_id")
    return session


async def current_object(service: Any, owner: str, session: Any) -> dict[str, Any]:
    """The stored object; a background one not finished yet takes its status from its task."""
    obj = dict(session.metadata.get("response") or {})
    task_id = session.metadata.get("task_id")
    if obj.get("status") not in ("queued", "in_progress") or not task_id:
        return obj
    task = await service.stores.tasks.get(task_id, owner)
    if task is None:
        return obj
    if task.status == "running":
        obj["status"] = "in_progress"
    elif task.status == "succeeded" and isinstance(task.result, dict):
        obj = task.result
    elif task.status == "failed":
        obj["status"] = "failed"
        obj["error"] = {"code": task.error.code if task.error else "server_error",
                        "message": task.error.message if task.error else "failed"}
    elif task.status == "cancelled":
        obj["status"] = "cancelled"
    return obj


async def _background_events(service: Any, owner: str, response_id: str, starting_after: int
                             ) -> AsyncIterator[bytes]:
    """A background response as a stream: created (and in_progress) now, its items and the final event when its
    task ends. ``starting_after`` skips events up to that sequence number (resume)."""
    emit = EventStream()
    sent_progress = False

    def out(chunk: bytes) -> bytes | None:
        """The event just numbered, unless the client saw it already."""
        return chunk if emit.sequence - 1 > starting_after else None

    session = await stored_response(service.stores.sessions, owner, response_id)
    if session is None:
        return
    obj = await current_object(service, owner, session)
    first = out(emit("response.created", response={**obj, "output": [], "status": "queued"}))
    if first:
        yield first
    while True:
        if obj.get("status") == "in_progress" and not sent_progress:
            sent_progress = True
            chunk = out(emit("response.in_progress", response=obj))
            if chunk:
                yield chunk
        if obj.get("status") not in ("queued", "in_progress"):
            break
        await asyncio.sleep(0.1)
        session = await stored_response(service.stores.sessions, owner, response_id)
        if session is None:
            return
        obj = await current_object(service, owner, session)
    if not sent_progress:
        chunk = out(emit("response.in_progress", response={**obj, "status": "in_progress", "output": []}))
        if chunk:
            yield chunk
    base = emit.sequence
    for offset, chunk in enumerate(item_events(emit, obj.get("output") or [])):
        if base + offset > starting_after:
            yield chunk
    chunk = out(emit(_final_event(obj), response=obj))
    if chunk:
        yield chunk


@router.get("/v1/responses/{response_id}", tags=["openai"])
async def retrieve_response(request: Request, response_id: str, stream: bool = False,
                            starting_after: int | None = Query(None, ge=0)) -> Any:
    """A stored response; for a background one its live status. ``stream=true`` streams a background response's
    events (resume with ``starting_after`` = the last sequence number seen)."""
    service = _service(request)
    owner = _owner(request)
    session = await _session(request, response_id)
    if stream:
        if not session.metadata.get("task_id"):
            raise ResponsesInputError("only background responses can be streamed after creation", param="stream")
        return StreamingResponse(_background_events(service, owner, response_id,
                                                    -1 if starting_after is None else starting_after),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await current_object(service, owner, session)


@router.post("/v1/responses/{response_id}/cancel", tags=["openai"])
async def cancel_response(request: Request, response_id: str) -> dict[str, Any]:
    """Cancel a background response (queued: at once; running: at its next step)."""
    service = _service(request)
    owner = _owner(request)
    session = await _session(request, response_id)
    task_id = session.metadata.get("task_id")
    if not task_id:
        raise ResponsesInputError("only background responses can be cancelled", param="response_id")
    await service.stores.tasks.cancel(task_id, owner)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        task = await service.stores.tasks.get(task_id, owner)
        if task is None or task.status in TERMINAL_STATUSES:
            break
        await asyncio.sleep(0.05)
    session = await _session(request, response_id)
    return await current_object(service, owner, session)


@router.delete("/v1/responses/{response_id}", tags=["openai"])
async def delete_response(request: Request, response_id: str) -> dict[str, Any]:
    """Delete a stored response (a running background one is cancelled). Responses that continued it keep their
    own turns; their chain now starts after it."""
    service = _service(request)
    owner = _owner(request)
    session = await _session(request, response_id)
    task_id = session.metadata.get("task_id")
    if task_id:
        await service.stores.tasks.cancel(task_id, owner)
    await service.stores.sessions.delete(response_id, owner)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items", tags=["openai"])
async def list_input_items(request: Request, response_id: str, limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc", after: str | None = Query(None, max_length=200),
                           include: list[str] | None = Query(None)) -> dict[str, Any]:
    """The input items of a stored response (this turn's messages). ``include`` is accepted and ignored: input
    items carry everything there is."""
    del include
    await _session(request, response_id)
    items = await input_items(_service(request).stores.sessions, _owner(request), response_id)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
