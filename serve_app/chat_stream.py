"""The one OpenAI chat stream: engine ``Delta`` s -> ``chat.completion.chunk`` server-sent events.

``POST /v1/chat/completions`` with ``stream: true`` answers through :func:`chat_stream_response` (the route has
already waited for the first delta, so errors before it are plain HTTP errors). The events:

* a role chunk (``{"role": "assistant", "content": ""}``), then a chunk per delta that carries text, reasoning text or (when asked) logprobs;
* a finished answer (``stop`` / ``length``): a chunk with the finish reason, the usage chunk when
  ``stream_options.include_usage``, then ``data: [DONE]``;
* anything else - the engine's ``error`` or ``cancelled``, an exception or the deadline mid-stream, the model
  stopping without a finish reason - ends with ONE OpenAI error event ``data: {"error": {...}}`` and no
  ``[DONE]``: a client (the ``openai`` package raises ``APIError`` on it) sees a failure, not a short answer.

A client that goes away: Starlette stops the response (it watches for ``http.disconnect``; under Ray Serve the
proxy cancels the replica's request), which cancels this generator; its cleanup, shielded from that
cancellation, closes the engine stream - that aborts the request and frees its cache blocks - and releases the
key's concurrency slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi.responses import StreamingResponse

from connectors.delta_wire import coalesce, merge
from engine.runtime.request import Delta
from serve_app import openai_api

DONE = "[DONE]"


def sse_data(payload: dict[str, Any] | str) -> bytes:
    """One ``data:`` event. JSON never spans lines (``json.dumps`` escapes newlines), so one line suffices."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def chat_events(
    *, request_id: str, model: str, first: Delta, deltas: AsyncIterator[Delta], deadline: float,
    logprobs: bool, include_usage: bool, classify: Callable[[BaseException], Any],
    on_finish: Callable[[str, Delta], Awaitable[None]], release: Callable[[], Awaitable[None]],
) -> AsyncIterator[bytes]:
    """The SSE body (see the module docstring). ``classify`` maps an exception to an error with ``status``,
    ``code`` and ``message``; ``on_finish(text, final_delta)`` runs before ``[DONE]`` (metrics, session turn);
    ``release`` frees the request's concurrency slot when the stream ends, however it ends."""
    created = int(time.time())

    def chunk(**fields: Any) -> bytes:
        # as OpenAI: with include_usage every chunk but the usage one carries "usage": null
        return sse_data(openai_api.chunk(request_id, model, created, include_usage=include_usage, **fields))

    text_chunk = ChunkTemplates(lambda **fields: chunk(**fields))

    def error(status: int, code: str, message: str) -> bytes:
        return sse_data(openai_api.error_body(status, code, message))

    texts: list[str] = []
    # deltas that arrive while this stream's previous event is still being written go out as one event
    batches = coalesce(deltas)
    pending: list[Delta] = []
    try:
        yield chunk(role="assistant", content="")
        delta = first
        while True:
            texts.append(delta.text)
            if delta.logprobs and logprobs:
                yield chunk(content=delta.text or None, reasoning=delta.reasoning_text or None,
                            logprobs=delta.logprobs)
            elif delta.text or delta.reasoning_text:
                yield text_chunk(delta.text, delta.reasoning_text)
            if delta.finish_reason is not None:
                break
            try:
                if not pending:
                    async with asyncio.timeout(max(0.001, deadline - time.monotonic())):  # no task per token
                        pending = merge(await anext(batches))
                delta = pending.pop(0)
            except StopAsyncIteration:
                yield error(500, "internal_error", "the model stopped before finishing the answer")
                return
            except Exception as exc:  # noqa: BLE001 - every failure becomes the stream's error event
                err = classify(exc)
                yield error(err.status, err.code, err.message)
                return
        finish = openai_api.map_finish_reason(delta.finish_reason)
        if finish is None:  # the engine's "error" / "cancelled": not an answer
            if delta.finish_reason == "error":
                yield error(500, "generation_failed", delta.error or "generation failed")
            else:
                yield error(503, "cancelled", delta.error or "the generation was cancelled")
            return
        yield chunk(finish_reason=finish)
        if include_usage and delta.usage is not None:
            yield chunk(usage=delta.usage)
        try:
            await on_finish("".join(texts), delta)
        except Exception as exc:  # noqa: BLE001 - e.g. the session store is down: the turn was not kept
            err = classify(exc)
            yield error(err.status, err.code, err.message)
            return
        yield sse_data(DONE)
    finally:
        # Also runs when the client went away and the response task was cancelled: shielded, so the engine
        # request is surely aborted and the slot surely released.
        with anyio.CancelScope(shield=True):
            try:
                await batches.aclose()  # closes ``deltas`` too (the engine request is aborted)
                with contextlib.suppress(RuntimeError):  # "already running": its reader is still closing it
                    await deltas.aclose()
            finally:
                await release()


class ChunkTemplates:
    """The text chunks of one stream without building and encoding the whole chunk per token: the chunk is
    encoded once per shape (content / reasoning / both) with placeholder strings, split around them, and each
    token's text is JSON-encoded into the gaps. The bytes are exactly those of ``render`` (json.dumps encodes a
    string value the same inside an object as alone), which tests/test_chat_stream.py checks."""

    _SLOTS = ("\x00kimiray-content\x00", "\x00kimiray-reasoning\x00")

    def __init__(self, render: Callable[..., bytes]) -> None:
        self.render = render
        self._parts: dict[tuple[bool, bool], list[bytes]] = {}

    def _split(self, shape: tuple[bool, bool]) -> list[bytes]:
        content, reasoning = shape
        rendered = self.render(content=self._SLOTS[0] if content else None,
                               reasoning=self._SLOTS[1] if reasoning else None)
        parts: list[bytes] = [rendered]
        for slot, used in zip(self._SLOTS, shape):
            if used:
                head, _, tail = parts.pop().partition(json.dumps(slot).encode())
                parts += [head, tail]
        return parts

    def __call__(self, content: str, reasoning: str) -> bytes:
        shape = (bool(content), bool(reasoning))
        parts = self._parts.get(shape)
        if parts is None:
            parts = self._parts[shape] = self._split(shape)
        values = [v for v, used in zip((content, reasoning), shape) if used]
        out = [parts[0]]
        for value, tail in zip(values, parts[1:]):
            out += [json.dumps(value, ensure_ascii=False).encode(), tail]
        return b"".join(out)


def chat_stream_response(events: AsyncIterator[bytes], request_id: str) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})
