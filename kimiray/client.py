"""Python SDK for a kimiray server: agent tasks, their event streams, chat completions and sessions.

``Client`` (sync, ``httpx.Client``) and ``AsyncClient`` (``httpx.AsyncClient``) have the same methods::

    from kimiray.client import Client

    with Client("http://127.0.0.1:8000", api_key="sk-...") as kc:
        task = kc.submit("contract_extraction", {"url": "https://example.com/c.pdf"})
        for event in kc.stream_events(task.id):      # reconnects by itself (Last-Event-ID)
            print(event.type, event.data)
        task = kc.wait(task.id, timeout=600)         # raises TaskFailedError / TaskCancelledError / WaitTimeoutError
        print(task.result)
        print(kc.chat("What is in this picture?", images=["shot.png"]).text)

Retries (``max_retries``, default 2; waits ``0.5 s * 2**attempt`` or the server's ``Retry-After``, capped at
``max_retry_wait``). Only requests that cannot do anything twice are retried after the connection broke:

* reads (``get``, ``list_tasks``, sessions ``GET``), ``cancel`` (cancelling twice is cancelling once) and
  ``submit`` retry on connection errors, timeouts, 429, 502, 503 and 504;
* ``submit`` always sends an idempotency key: yours, or a fresh ``uuid4`` when you give none. A retried submit
  therefore returns the task the first attempt created instead of starting a second one (the answer has
  ``created=False`` then). Pass your own key to make a submit safe across process restarts too;
* ``chat`` and session writes retry only when the server surely did nothing: could not connect, 429, 503;
* no other 4xx is ever retried.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import mimetypes
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from kimiray import __version__
from kimiray.batch import BATCH_ENDPOINT, TERMINAL_BATCH_STATUSES, jsonl_bytes, multipart_upload, parse_jsonl
from kimiray.errors import (
    APITimeoutError,
    AuthenticationError,
    ConnectionError,
    KimirayError,
    ServerError,
    TaskCancelledError,
    TaskFailedError,
    WaitTimeoutError,
    error_for,
    error_from_response,
)
from kimiray.types import ChatResult, Session, SessionMessage, Task, TaskEvent, TaskPage

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_MODEL = "kimi-vl"
USER_AGENT = f"kimiray-python/{__version__}"

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Mapping | Any  # Any: a PIL image
Messages = str | Mapping[str, Any] | Sequence[Mapping[str, Any]]

# Retry policies: which failures a request may be repeated after.
_IDEMPOTENT = "idempotent"  # doing it twice = doing it once: any transport error, 429, 502, 503, 504
_REFUSED = "refused"  # not idempotent: only when the server surely did nothing (no connection, 429, 503)
_RETRY_STATUSES = {_IDEMPOTENT: frozenset({429, 502, 503, 504}), _REFUSED: frozenset({429, 503})}
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # the request never left


# ------------------------------------------------------------------------------------------------------------
# Server-sent events
# ------------------------------------------------------------------------------------------------------------
@dataclass
class ServerSentEvent:
    event: str | None
    data: str
    id: str | None


class SSEDecoder:
    """Line-at-a-time ``text/event-stream`` parser (``data`` lines joined, ``:`` comments skipped)."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        """Returns an event when ``line`` is the blank line that ends one."""
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def flush(self) -> ServerSentEvent | None:
        """The pending event (a stream may end without its last blank line)."""
        if not self._data and self._event is None:
            return None
        sse = ServerSentEvent(self._event, "\n".join(self._data), self._id)
        self._data, self._event, self._id = [], None, None
        return sse


def _task_event(sse: ServerSentEvent, task_id: str) -> TaskEvent | None:
    """The TaskEvent an SSE frame carries; None for frames without an id (nothing to resume from)."""
    try:
        payload: Any = json.loads(sse.data) if sse.data else {}
    except ValueError:
        payload = {"data": {"text": sse.data}}
    if not isinstance(payload, dict):
        payload = {"data": {"value": payload}}
    if "error" in payload and "type" not in payload:  # the server gave up on the stream
        raise error_for(None, payload)
    event_id = payload.get("id", sse.id)
    try:
        event_id = int(event_id)
    except (TypeError, ValueError):
        return None
    data = payload.get("data")
    return TaskEvent.model_validate({
        **payload, "id": event_id, "task_id": payload.get("task_id") or task_id,
        "type": payload.get("type") or sse.event or "message",
        "data": data if isinstance(data, dict) else ({} if data is None else {"value": data}),
    })


class _Resume:
    """One logical event stream across reconnects: the last id handed out (so nothing repeats or is skipped)
    and the reconnect budget, which refills whenever an event arrives."""

    def __init__(self, task_id: str, after: int, max_reconnects: int, max_wait: float) -> None:
        self.task_id = task_id
        self.last = int(after)
        self.failures = 0
        self.max_reconnects = max_reconnects
        self.max_wait = max_wait

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last:
            headers["Last-Event-ID"] = str(self.last)
        return headers

    def accept(self, event: TaskEvent) -> bool:
        if event.id <= self.last:
            return False
        self.last = event.id
        self.failures = 0
        return True

    def dropped(self, cause: BaseException | None) -> float:
        """Counts a lost connection; the wait before reconnecting, or raises when the budget is spent."""
        self.failures += 1
        if self.failures > self.max_reconnects:
            raise ConnectionError(
                f"event stream of task {self.task_id} lost {self.failures} times in a row "
                f"(last event {self.last}): {cause or 'closed before the task ended'}"
            ) from cause
        return min(self.max_wait, 0.25 * 2 ** (self.failures - 1))


# ------------------------------------------------------------------------------------------------------------
# Request bodies and answers (shared by both clients)
# ------------------------------------------------------------------------------------------------------------
def _root_url(url: str) -> str:
    """``http://host:8000``, ``http://host:8000/`` and ``http://host:8000/v1`` all name the same server."""
    url = url.strip().rstrip("/")
    url = url.removesuffix("/v1")
    if "://" not in url:
        url = "http://" + url
    return url


def _path(*parts: str) -> str:
    return "/v1/" + "/".join(quote(str(p), safe="") for p in parts)


def _submit_body(type: str, input: Any, options: Mapping[str, Any] | None,
                 idempotency_key: str | None) -> dict[str, Any]:
    return {"type": type, "input": {} if input is None else input, "options": dict(options or {}),
            "idempotency_key": idempotency_key or str(uuid.uuid4())}


def _list_params(status: str | None, type: str | None, limit: int | None, cursor: str | None) -> dict[str, Any]:
    params = {"status": status, "type": type, "limit": limit, "cursor": cursor}
    return {k: v for k, v in params.items() if v is not None}


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


def sniff_image_type(data: bytes) -> str | None:
    """Media type from an image's first bytes; None when unknown."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    return None


def data_url(data: bytes, mime: str | None = None) -> str:
    mime = mime or sniff_image_type(data) or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_url(image: ImageInput) -> str:
    """A URL the server accepts for ``image``: http(s) and ``data:`` URLs as they are; a local path, raw bytes
    or a PIL image encoded into a ``data:`` URL (PIL images as PNG)."""
    if isinstance(image, str) and image.split(":", 1)[0].lower() in ("http", "https", "data"):
        return image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image).expanduser()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read image {str(path)!r}: {exc.strerror or exc}") from None
        return data_url(data, sniff_image_type(data) or mimetypes.guess_type(path.name)[0])
    if isinstance(image, (bytes, bytearray, memoryview)):
        return data_url(bytes(image))
    if hasattr(image, "save") and hasattr(image, "mode"):  # PIL.Image.Image, without importing PIL
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return data_url(buf.getvalue(), "image/png")
    raise TypeError(f"unsupported image: {type(image).__name__} (give a path, URL, bytes or a PIL image)")


def _image_part(image: ImageInput) -> dict[str, Any]:
    if isinstance(image, Mapping):  # already an OpenAI content part
        return dict(image)
    return {"type": "image_url", "image_url": {"url": image_url(image)}}


def build_messages(messages: Messages, images: ImageInput | Sequence[ImageInput] | None = None) -> list[dict]:
    """OpenAI messages from a string or message list; ``images`` go first into the last user message."""
    if isinstance(messages, str):
        out = [{"role": "user", "content": messages}]
    elif isinstance(messages, Mapping):
        out = [dict(messages)]
    else:
        out = [dict(m) for m in messages]
    if images is None:
        return out
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Mapping)) or not isinstance(
            images, Sequence):
        images = [images]
    parts = [_image_part(im) for im in images]
    if not parts:
        return out
    target = next((m for m in reversed(out) if m.get("role") == "user"), None)
    if target is None:
        target = {"role": "user", "content": []}
        out.append(target)
    content = target.get("content")
    if content is None or content == "":
        target["content"] = parts
    elif isinstance(content, str):
        target["content"] = [*parts, {"type": "text", "text": content}]
    else:
        target["content"] = [*parts, *content]
    return out


def response_format(schema: Any) -> dict[str, Any]:
    """``response_format`` for a JSON schema dict, a ``{"name", "schema"}`` spec, or a pydantic model class."""
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        spec: dict[str, Any] = {"name": schema.__name__, "schema": schema.model_json_schema(), "strict": True}
    elif isinstance(schema, Mapping) and isinstance(schema.get("schema"), Mapping):
        spec = dict(schema)
    elif isinstance(schema, Mapping):
        spec = {"name": "response", "schema": dict(schema), "strict": True}
    else:
        raise TypeError(f"json_schema must be a dict or a pydantic model class, not {type(schema).__name__}")
    return {"type": "json_schema", "json_schema": spec}


def _chat_body(messages: Messages, *, session_id: str | None, model: str, max_tokens: int | None,
               temperature: float | None, json_schema: Any, images: Any, stream: bool,
               extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": build_messages(messages, images)}
    if session_id is not None:
        body["session_id"] = session_id
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if json_schema is not None:
        body["response_format"] = response_format(json_schema)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return body


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return str(content)


def chat_result(body: Mapping[str, Any]) -> ChatResult:
    """A ``chat.completion`` object -> ChatResult."""
    choices = body.get("choices") or [{}]
    choice = choices[0] or {}
    message = choice.get("message") or {}
    return ChatResult(
        text=_text_of(message.get("content")), reasoning=message.get("reasoning_content") or None,
        finish_reason=choice.get("finish_reason"), usage=dict(body.get("usage") or {}),
        session_id=body.get("session_id"), id=body.get("id"), model=body.get("model"), raw=dict(body),
    )


class _ChatAccumulator:
    """Folds ``chat.completion.chunk`` payloads into text deltas and, at the end, one ChatResult."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.last: dict[str, Any] = {}
        self.done = False
        self._decoder = SSEDecoder()

    def line(self, line: str) -> str:
        """One line of the SSE body -> the text delta it completes ('' for none); sets ``done`` at ``[DONE]``."""
        sse = self._decoder.feed(line)
        if sse is None or self.done:
            return ""
        if sse.data.strip() == "[DONE]":
            self.done = True
            return ""
        return self.feed(sse.data)

    def feed(self, data: str) -> str:
        try:
            chunk = json.loads(data)
        except ValueError:
            raise ServerError(f"unreadable stream chunk: {data[:200]!r}") from None
        if not isinstance(chunk, dict):
            return ""
        if "error" in chunk:
            raise error_for(None, chunk)
        self.last = chunk
        if chunk.get("usage"):
            self.usage = dict(chunk["usage"])
        delta_text = ""
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            delta_text = _text_of(delta.get("content"))
            if delta.get("reasoning_content"):
                self.reasoning.append(delta["reasoning_content"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if delta_text:
            self.text.append(delta_text)
        return delta_text

    def result(self) -> ChatResult:
        return ChatResult(
            text="".join(self.text), reasoning="".join(self.reasoning) or None, finish_reason=self.finish_reason,
            usage=self.usage, session_id=self.last.get("session_id"), id=self.last.get("id"),
            model=self.last.get("model"), raw=self.last,
        )


def _transport_error(exc: httpx.TransportError, url: Any) -> KimirayError:
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        return APITimeoutError(f"no answer from {url} in time: {exc!r}")
    return ConnectionError(f"cannot reach {url}: {exc}" if isinstance(exc, _NOT_SENT)
                           else f"connection to {url} broke: {exc!r}")


def _may_retry(policy: str | None, failure: BaseException) -> bool:
    if policy is None:
        return False
    if isinstance(failure, httpx.TransportError):
        return policy == _IDEMPOTENT or isinstance(failure, _NOT_SENT)
    return isinstance(failure, KimirayError) and failure.status in _RETRY_STATUSES[policy]


def _transient(error: KimirayError) -> bool:
    """Worth reconnecting an event stream after: no answer, or the server busy / restarting."""
    return error.status is None or error.status in (429, 502, 503, 504)


def _finish_wait(task: Task, task_id: str, timeout: float | None, raise_on_failure: bool) -> Task:
    if not task.done:
        raise WaitTimeoutError(task_id, timeout, task)
    if raise_on_failure and task.status == "failed":
        raise TaskFailedError(task)
    if raise_on_failure and task.status == "cancelled":
        raise TaskCancelledError(task)
    return task


def _expired(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _json_body(response: httpx.Response) -> Any:
    if response.status_code == 204 or not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise ServerError(f"HTTP {response.status_code} answer is not JSON: {response.text[:200]!r}",
                          status=response.status_code) from None


# ------------------------------------------------------------------------------------------------------------
# One core for both clients: every request is a plan (a generator) that yields the I/O it needs and gets the
# answers back; Client runs plans with blocking calls, AsyncClient with awaits. Retries, reconnects, parsing
# and errors live in the plans, once.
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Send:
    """Send ``request``; answered with the response, or the transport error is thrown into the plan."""
    request: httpx.Request
    stream: bool = False


@dataclass
class _Discard:
    """Read (best effort) and close an error answer, so its body is available to error_from_response."""
    response: httpx.Response


@dataclass
class _Close:
    response: httpx.Response


@dataclass
class _NextLine:
    """The next line of a streamed body; None at its end."""
    response: httpx.Response


@dataclass
class _Sleep:
    seconds: float


@dataclass
class _Emit:
    """Hand ``item`` to the caller of an iterating method (``stream_events``, ``iter_tasks``)."""
    item: Any


_Op = _Send | _Discard | _Close | _NextLine | _Sleep | _Emit
Plan = Generator[_Op, Any, Any]


def _drop_events(plan: Plan) -> Plan:
    """Runs an iterating plan inside another one, dropping what it emits (``wait`` follows the event stream
    only to learn when the task ends)."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = plan.throw(error) if error is not None else plan.send(result)
        except StopIteration as stop:
            return stop.value
        result, error = None, None
        if isinstance(op, _Emit):
            continue
        try:
            result = yield op
        except Exception as exc:  # noqa: BLE001 - handed to the inner plan, like ``yield from`` does
            error = exc


class _Core:
    """Settings and the request plans both clients share; subclasses add only the transport."""

    _http: httpx.Client | httpx.AsyncClient

    def __init__(self, url: str | None, api_key: str | None, *, timeout: float, max_retries: int,
                 max_retry_wait: float, max_reconnects: int, headers: Mapping[str, str] | None) -> None:
        self.base_url = _root_url(url or os.environ.get("KIMIRAY_URL") or DEFAULT_URL)
        self.api_key = api_key if api_key is not None else os.environ.get("KIMIRAY_API_KEY")
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.max_reconnects = max_reconnects
        self._headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **dict(headers or {})}
        if self.api_key:
            self._headers["Authorization"] = f"Bearer {self.api_key}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    def _delay(self, attempt: int, failure: BaseException) -> float:
        after = getattr(failure, "retry_after", None)
        return min(self.max_retry_wait, after if after is not None else 0.5 * 2**attempt)

    def _stream_timeout(self, deadline: float | None) -> httpx.Timeout:
        """Reads on an event stream wait ``timeout`` (keepalives arrive well within it), less near a deadline."""
        read = self.timeout
        if deadline is not None:
            read = max(0.01, min(read, deadline - time.monotonic()))
        return httpx.Timeout(self.timeout, read=read)

    def _request(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None, timeout: httpx.Timeout | None = None,
                 content: bytes | None = None) -> httpx.Request:
        return self._http.build_request(method, self.base_url + path, json=json, params=params, content=content,
                                        headers={**self._headers, **dict(headers or {})},
                                        timeout=timeout if timeout is not None else httpx.Timeout(self.timeout))

    # -- requests ----------------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, *, policy: str | None, stream: bool = False, **kwargs: Any) -> Plan:
        """One request with retries per ``policy``; an error answer raises its KimirayError."""
        attempt = 0
        while True:
            request = self._request(method, path, **kwargs)
            try:
                response = yield _Send(request, stream)
            except httpx.TransportError as exc:
                if attempt < self.max_retries and _may_retry(policy, exc):
                    yield _Sleep(self._delay(attempt, exc))
                    attempt += 1
                    continue
                raise _transport_error(exc, request.url) from exc
            if response.status_code < 400:
                return response
            yield _Discard(response)
            error = error_from_response(response)
            if attempt < self.max_retries and _may_retry(policy, error):
                yield _Sleep(self._delay(attempt, error))
                attempt += 1
                continue
            raise error

    def _call(self, method: str, path: str, *, policy: str | None, **kwargs: Any) -> Plan:
        return _json_body((yield from self._send(method, path, policy=policy, **kwargs)))

    # -- tasks -------------------------------------------------------------------------------------------------
    def _submit(self, type: str, input: Any, options: Mapping[str, Any] | None,
                idempotency_key: str | None) -> Plan:
        body = _submit_body(type, input, options, idempotency_key)
        return Task.model_validate((yield from self._call("POST", "/v1/tasks", json=body, policy=_IDEMPOTENT)))

    def _get(self, task_id: str) -> Plan:
        return Task.model_validate((yield from self._call("GET", _path("tasks", task_id), policy=_IDEMPOTENT)))

    def _list_tasks(self, status: str | None, type: str | None, limit: int | None, cursor: str | None) -> Plan:
        params = _list_params(status, type, limit, cursor)
        return TaskPage.model_validate((yield from self._call("GET", "/v1/tasks", params=params,
                                                              policy=_IDEMPOTENT)))

    def _iter_tasks(self, status: str | None, type: str | None, page_size: int) -> Plan:
        cursor = None
        while True:
            page = yield from self._list_tasks(status, type, page_size, cursor)
            for task in page.data:
                yield _Emit(task)
            if not page.next_cursor or not page.data:
                return
            cursor = page.next_cursor

    def _cancel(self, task_id: str) -> Plan:
        return Task.model_validate((yield from self._call("POST", _path("tasks", task_id, "cancel"),
                                                          policy=_IDEMPOTENT)))

    def _confirm(self, task_id: str, step: int, approve: bool) -> Plan:
        return (yield from self._call("POST", _path("tasks", task_id, "confirm"),
                                      json={"step": step, "approve": approve}, policy=_IDEMPOTENT))

    def _reply(self, task_id: str, step: int, text: str) -> Plan:
        return (yield from self._call("POST", _path("tasks", task_id, "reply"),
                                      json={"step": step, "text": text}, policy=_IDEMPOTENT))

    def _events(self, task_id: str, after: int, deadline: float | None) -> Plan:
        """Emits the task's events once each, in order, reconnecting from the last one seen."""
        resume = _Resume(task_id, after, self.max_reconnects, self.max_retry_wait)
        path = _path("tasks", task_id, "events")
        while not _expired(deadline):
            cause: BaseException | None = None
            response = None
            try:
                response = yield from self._send("GET", path, policy=_IDEMPOTENT, stream=True,
                                                 headers=resume.headers(), timeout=self._stream_timeout(deadline))
                decoder = SSEDecoder()
                while True:
                    line = yield _NextLine(response)
                    sse = decoder.feed(line) if line is not None else decoder.flush()
                    event = _task_event(sse, task_id) if sse is not None else None
                    if event is not None and resume.accept(event):
                        yield _Emit(event)
                        if event.is_terminal:
                            yield _Close(response)
                            return
                    if line is None:
                        break
                    if _expired(deadline):
                        yield _Close(response)
                        return
            except httpx.TransportError as exc:
                cause = exc
            except KimirayError as exc:  # the reconnect itself failed after its retries
                if not _transient(exc):
                    raise
                cause = exc
            if response is not None:
                yield _Close(response)
            if _expired(deadline):
                return
            if cause is None:  # closed cleanly, no final event: over already, or the server went away?
                try:
                    task = yield from self._get(task_id)
                except KimirayError as exc:
                    if not _transient(exc):
                        raise
                    cause = exc
                else:
                    if task.done and task.last_event_id <= resume.last:
                        return
            yield _Sleep(resume.dropped(cause))

    def _wait(self, task_id: str, timeout: float | None, raise_on_failure: bool, poll_interval: float) -> Plan:
        deadline = None if timeout is None else time.monotonic() + timeout
        task = yield from self._get(task_id)
        if not task.done:
            try:
                yield from _drop_events(self._events(task_id, task.last_event_id, deadline))
            except AuthenticationError:
                raise
            except KimirayError:
                pass  # no usable stream: polling below still gets there
            task = yield from self._get(task_id)
            while not task.done and not _expired(deadline):
                pause = poll_interval if deadline is None else min(poll_interval, deadline - time.monotonic())
                yield _Sleep(max(0.0, pause))
                poll_interval = min(poll_interval * 1.5, 5.0)
                task = yield from self._get(task_id)
        return _finish_wait(task, task_id, timeout, raise_on_failure)

    # -- chat, sessions, files ---------------------------------------------------------------------------------
    def _chat(self, body: dict[str, Any]) -> Plan:
        """A ChatResult, or (``stream``) the open streamed response."""
        if not body.get("stream"):
            return chat_result((yield from self._call("POST", "/v1/chat/completions", json=body, policy=_REFUSED)))
        return (yield from self._send("POST", "/v1/chat/completions", json=body, policy=_REFUSED, stream=True,
                                      headers={"Accept": "text/event-stream"}))

    def _create_session(self, metadata: Mapping[str, Any] | None, ttl_s: float | None) -> Plan:
        body = {"metadata": dict(metadata or {}), "ttl_s": ttl_s}
        return Session.model_validate((yield from self._call("POST", "/v1/sessions", json=body, policy=_REFUSED)))

    def _get_session(self, session_id: str) -> Plan:
        return Session.model_validate((yield from self._call("GET", _path("sessions", session_id),
                                                             policy=_IDEMPOTENT)))

    def _session_messages(self, session_id: str, start: int | None, end: int | None) -> Plan:
        params = {k: v for k, v in {"start": start, "end": end}.items() if v is not None}
        body = yield from self._call("GET", _path("sessions", session_id, "messages"), params=params,
                                     policy=_IDEMPOTENT)
        return [SessionMessage.model_validate(m) for m in (body or {}).get("data", [])]

    def _delete_session(self, session_id: str) -> Plan:
        yield from self._call("DELETE", _path("sessions", session_id), policy=_REFUSED)

    def _upload_file(self, data: bytes | str | Path, content_type: str) -> Plan:
        payload = Path(data).read_bytes() if isinstance(data, (str, Path)) else bytes(data)
        body = yield from self._call("POST", "/v1/files", content=payload, headers={"Content-Type": content_type},
                                     policy=_IDEMPOTENT)
        return str(body["ref"])

    def _download_artifact(self, task_id: str, name: str, path: str | Path | None) -> Plan:
        response = yield from self._send("GET", _path("tasks", task_id, "artifacts", name), policy=_IDEMPOTENT)
        data = response.content
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def _batch_file(self, requests: Any, filename: str, model: str) -> Plan:
        if isinstance(requests, (str, Path)) and filename == "batch.jsonl":
            filename = Path(requests).name
        body, content_type = multipart_upload(jsonl_bytes(requests, model=model), filename)
        return (yield from self._call("POST", "/v1/files", content=body, headers={"Content-Type": content_type},
                                      policy=_REFUSED))

    def _create_batch(self, input_file_id: str, metadata: Mapping[str, str] | None) -> Plan:
        body: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": BATCH_ENDPOINT, "completion_window": "24h"}
        if metadata:
            body["metadata"] = dict(metadata)
        return (yield from self._call("POST", "/v1/batches", json=body, policy=_REFUSED))

    def _get_batch(self, batch_id: str) -> Plan:
        return (yield from self._call("GET", _path("batches", batch_id), policy=_IDEMPOTENT))

    def _cancel_batch(self, batch_id: str) -> Plan:
        return (yield from self._call("POST", _path("batches", batch_id, "cancel"), policy=_IDEMPOTENT))

    def _wait_batch(self, batch_id: str, timeout: float | None, poll_s: float,
                    on_progress: Callable[[Mapping[str, Any]], None] | None) -> Plan:
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: Any = None
        while True:
            batch = yield from self._get_batch(batch_id)
            key = (batch.get("status"), json.dumps(batch.get("request_counts"), sort_keys=True))
            if on_progress is not None and key != seen:
                on_progress(batch)
            seen = key
            if batch.get("status") in TERMINAL_BATCH_STATUSES:
                return batch
            if _expired(deadline):
                raise WaitTimeoutError(batch_id, timeout)
            yield _Sleep(poll_s)

    def _file_content(self, file_id: str) -> Plan:
        response = yield from self._send("GET", _path("files", file_id, "content"), policy=_IDEMPOTENT)
        return response.content

    def _batch_results(self, batch: Mapping[str, Any] | str) -> Plan:
        info = (yield from self._get_batch(batch)) if isinstance(batch, str) else batch
        lines: dict[str, dict[str, Any]] = {}
        for key in ("output_file_id", "error_file_id"):
            if info.get(key):
                for line in parse_jsonl((yield from self._file_content(info[key]))):
                    lines[line["custom_id"]] = line
        return lines

    def _health(self) -> Plan:
        try:
            response = yield _Send(self._request("GET", "/readyz"))
        except httpx.HTTPError:
            return False
        return response.status_code == 200


# ------------------------------------------------------------------------------------------------------------
# Sync
# ------------------------------------------------------------------------------------------------------------
class ChatStream:
    """``chat(stream=True)``: iterate for text deltas; ``result`` holds the whole ChatResult once done."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._acc = _ChatAccumulator()
        self.result: ChatResult | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for line in self._response.iter_lines():
                text = self._acc.line(line)
                if text:
                    yield text
                if self._acc.done:
                    break
        except httpx.TransportError as exc:
            raise _transport_error(exc, self._response.request.url) from exc
        finally:
            self.close()

    def text(self) -> str:
        """Read the stream to the end and return all of the text."""
        return "".join(self)

    def close(self) -> None:
        self._response.close()
        if self.result is None:
            self.result = self._acc.result()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(_Core):
    """Sync client. ``url`` defaults to ``$KIMIRAY_URL`` (else ``http://127.0.0.1:8000``) and may end in
    ``/v1``; ``api_key`` to ``$KIMIRAY_API_KEY``. ``sleep`` is injectable so tests need not wait."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 2, transport: httpx.BaseTransport | None = None,
                 max_retry_wait: float = 30.0, max_reconnects: int = 5,
                 headers: Mapping[str, str] | None = None,
                 sleep: Callable[[float], None] | None = None) -> None:
        super().__init__(url, api_key, timeout=timeout, max_retries=max_retries, max_retry_wait=max_retry_wait,
                         max_reconnects=max_reconnects, headers=headers)
        self._http = httpx.Client(transport=transport, timeout=timeout)
        self._sleep = sleep or time.sleep

    # -- the transport: runs plans with blocking calls -------------------------------------------------------
    def _perform(self, op: _Op, lines: dict[int, Iterator[str]]) -> Any:
        if isinstance(op, _Send):
            return self._http.send(op.request, stream=op.stream)
        if isinstance(op, _NextLine):
            it = lines.get(id(op.response))
            if it is None:
                it = lines[id(op.response)] = op.response.iter_lines()
            return next(it, None)
        if isinstance(op, _Discard):
            try:
                op.response.read()
            except httpx.TransportError:
                pass
            finally:
                op.response.close()
        elif isinstance(op, _Close):
            lines.pop(id(op.response), None)
            op.response.close()
        elif isinstance(op, _Sleep):
            self._sleep(op.seconds)
        return None

    def _iterate(self, plan: Plan) -> Generator[Any, None, Any]:
        """Runs ``plan``, yielding what it emits; returns its result. Streams it opened are closed at the end,
        also when the caller stops iterating early."""
        opened: list[httpx.Response] = []
        lines: dict[int, Iterator[str]] = {}
        result: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    op = plan.throw(error) if error is not None else plan.send(result)
                except StopIteration as stop:
                    if stop.value in opened:
                        opened.remove(stop.value)  # handed to the caller (a chat stream)
                    return stop.value
                result, error = None, None
                if isinstance(op, _Emit):
                    yield op.item
                    continue
                try:
                    result = self._perform(op, lines)
                except httpx.HTTPError as exc:
                    error = exc
                if isinstance(op, _Send) and op.stream and result is not None:
                    opened.append(result)
        finally:
            plan.close()
            for response in opened:
                response.close()

    def _run(self, plan: Plan) -> Any:
        try:
            next(self._iterate(plan))
        except StopIteration as stop:
            return stop.value
        raise RuntimeError("a request plan emitted items outside an iterating method")

    # -- tasks -------------------------------------------------------------------------------------------------
    def submit(self, type: str, input: Any = None, *, options: Mapping[str, Any] | None = None,
               idempotency_key: str | None = None) -> Task:
        """Start a task. Without ``idempotency_key`` a fresh uuid4 is sent, so retries never start it twice;
        ``Task.created`` is False when the key had been used before (you get that earlier task)."""
        return self._run(self._submit(type, input, options, idempotency_key))

    def get(self, task_id: str) -> Task:
        return self._run(self._get(task_id))

    def list_tasks(self, status: str | None = None, type: str | None = None,
                   limit: int | None = 50, cursor: str | None = None) -> TaskPage:
        """One page, newest first as the server orders them; pass ``next_cursor`` for the next page."""
        return self._run(self._list_tasks(status, type, limit, cursor))

    def iter_tasks(self, status: str | None = None, type: str | None = None,
                   *, page_size: int = 50) -> Iterator[Task]:
        """Every matching task, fetching pages as the iteration needs them."""
        return self._iterate(self._iter_tasks(status, type, page_size))

    def cancel(self, task_id: str) -> Task:
        """Ask the task to stop; it ends ``cancelled`` soon after (a finished task stays as it was)."""
        return self._run(self._cancel(task_id))

    def confirm(self, task_id: str, step: int, approve: bool = True) -> dict[str, Any]:
        """Answer an agent's ``confirmation_required`` event for ``step`` (an OS agent's risky action)."""
        return self._run(self._confirm(task_id, step, approve))

    def reply(self, task_id: str, step: int, text: str) -> dict[str, Any]:
        """Answer an agent's ``input_required`` event for ``step`` (an OS agent's ``call_user`` question)."""
        return self._run(self._reply(task_id, step, text))

    def stream_events(self, task_id: str, *, after: int = 0) -> Iterator[TaskEvent]:
        """Events with id > ``after``, live, ending after the one that ends the task. A dropped connection is
        resumed from the last event seen (``Last-Event-ID``), so each event comes exactly once, in order."""
        return self._iterate(self._events(task_id, after, None))

    def wait(self, task_id: str, timeout: float | None = None, *, raise_on_failure: bool = True,
             poll_interval: float = 1.0) -> Task:
        """Block until the task ends and return it. Follows the event stream; polls ``get`` if the stream is
        unavailable. Raises TaskFailedError / TaskCancelledError (unless ``raise_on_failure=False``) and
        WaitTimeoutError after ``timeout`` seconds (the task goes on)."""
        return self._run(self._wait(task_id, timeout, raise_on_failure, poll_interval))

    # -- chat and sessions -------------------------------------------------------------------------------------
    def chat(self, messages: Messages, *, session_id: str | None = None, model: str = DEFAULT_MODEL,
             max_tokens: int | None = None, temperature: float | None = None, json_schema: Any = None,
             images: Any = None, stream: bool = False, **extra: Any) -> ChatResult | ChatStream:
        """One chat completion. ``messages``: a string (one user turn) or OpenAI messages; ``images``: paths,
        URLs, bytes or PIL images, put before the text of the last user turn; ``session_id``: the server
        prepends that session's history and stores this turn. ``stream=True`` returns a :class:`ChatStream`
        of text deltas. Other OpenAI fields (``seed``, ``stop``...) pass through ``extra``."""
        body = _chat_body(messages, session_id=session_id, model=model, max_tokens=max_tokens,
                          temperature=temperature, json_schema=json_schema, images=images, stream=stream,
                          extra=extra)
        result = self._run(self._chat(body))
        return ChatStream(result) if stream else result

    def create_session(self, metadata: Mapping[str, Any] | None = None, ttl_s: float | None = None) -> Session:
        return self._run(self._create_session(metadata, ttl_s))

    def get_session(self, session_id: str) -> Session:
        return self._run(self._get_session(session_id))

    def session_messages(self, session_id: str, start: int | None = None,
                         end: int | None = None) -> list[SessionMessage]:
        return self._run(self._session_messages(session_id, start, end))

    def delete_session(self, session_id: str) -> None:
        self._run(self._delete_session(session_id))

    # -- files -------------------------------------------------------------------------------------------------
    def upload_file(self, data: bytes | str | Path, content_type: str = "application/pdf") -> str:
        """Upload a file for a task to use by reference (``{"blob": ref}``); returns the ref. Uploading the same
        bytes twice is harmless (content-addressed), so this retries like a read."""
        return self._run(self._upload_file(data, content_type))

    def download_artifact(self, task_id: str, name: str, path: str | Path | None = None) -> bytes:
        """A file a task produced (``task.result["artifacts"]``: e.g. ``annotated_pdf``); written to ``path``
        too when given."""
        return self._run(self._download_artifact(task_id, name, path))

    # -- OpenAI Batch API (kimiray.batch) -----------------------------------------------------------------------
    def batch_file(self, requests: Any, *, filename: str = "batch.jsonl", model: str = DEFAULT_MODEL
                   ) -> dict[str, Any]:
        """Upload a batch input file (``purpose="batch"``): a .jsonl path, its bytes, or request dicts (full lines
        or chat bodies, which get ``custom_id`` ``request-<n>``). A malformed line is an InvalidRequestError naming
        it. Returns the OpenAI file object."""
        return self._run(self._batch_file(requests, filename, model))

    def create_batch(self, input_file_id: str, *, metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
        return self._run(self._create_batch(input_file_id, metadata))

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        return self._run(self._get_batch(batch_id))

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self._run(self._cancel_batch(batch_id))

    def wait_batch(self, batch_id: str, timeout: float | None = None, *, poll_s: float = 1.0,
                   on_progress: Callable[[Mapping[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the batch ends (completed, failed, expired, cancelled); ``on_progress(batch)`` is called
        whenever its status or counts change. Raises WaitTimeoutError after ``timeout`` seconds."""
        return self._run(self._wait_batch(batch_id, timeout, poll_s, on_progress))

    def file_content(self, file_id: str) -> bytes:
        return self._run(self._file_content(file_id))

    def batch_results(self, batch: Mapping[str, Any] | str) -> dict[str, dict[str, Any]]:
        """Every output and error line of a finished batch, by ``custom_id``."""
        return self._run(self._batch_results(batch))

    # -- misc --------------------------------------------------------------------------------------------------
    def health(self) -> bool:
        """True when the server answers ``/readyz`` with 200 (a model replica is up); never raises."""
        return self._run(self._health())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------------
# Async
# ------------------------------------------------------------------------------------------------------------
class AsyncChatStream:
    """``await chat(stream=True)``: ``async for`` text deltas; ``result`` holds the ChatResult once done."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._acc = _ChatAccumulator()
        self.result: ChatResult | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        try:
            async for line in self._response.aiter_lines():
                text = self._acc.line(line)
                if text:
                    yield text
                if self._acc.done:
                    break
        except httpx.TransportError as exc:
            raise _transport_error(exc, self._response.request.url) from exc
        finally:
            await self.aclose()

    async def text(self) -> str:
        return "".join([t async for t in self])

    async def aclose(self) -> None:
        await self._response.aclose()
        if self.result is None:
            self.result = self._acc.result()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient(_Core):
    """The :class:`Client` API for asyncio: every method is a coroutine, ``stream_events`` an async iterator."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 2, transport: httpx.AsyncBaseTransport | None = None,
                 max_retry_wait: float = 30.0, max_reconnects: int = 5,
                 headers: Mapping[str, str] | None = None,
                 sleep: Callable[[float], Awaitable[None]] | None = None) -> None:
        super().__init__(url, api_key, timeout=timeout, max_retries=max_retries, max_retry_wait=max_retry_wait,
                         max_reconnects=max_reconnects, headers=headers)
        self._http = httpx.AsyncClient(transport=transport, timeout=timeout)
        self._sleep = sleep or asyncio.sleep

    # -- the transport: runs plans with awaits ---------------------------------------------------------------
    async def _perform(self, op: _Op, lines: dict[int, AsyncIterator[str]]) -> Any:
        if isinstance(op, _Send):
            return await self._http.send(op.request, stream=op.stream)
        if isinstance(op, _NextLine):
            it = lines.get(id(op.response))
            if it is None:
                it = lines[id(op.response)] = op.response.aiter_lines()
            return await anext(it, None)
        if isinstance(op, _Discard):
            try:
                await op.response.aread()
            except httpx.TransportError:
                pass
            finally:
                await op.response.aclose()
        elif isinstance(op, _Close):
            lines.pop(id(op.response), None)
            await op.response.aclose()
        elif isinstance(op, _Sleep):
            await self._sleep(op.seconds)
        return None

    async def _iterate(self, plan: Plan, out: list[Any] | None = None) -> AsyncIterator[Any]:
        """Runs ``plan``, yielding what it emits; its result goes into ``out``. Streams it opened are closed at
        the end, also when the caller stops iterating early."""
        opened: list[httpx.Response] = []
        lines: dict[int, AsyncIterator[str]] = {}
        result: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    op = plan.throw(error) if error is not None else plan.send(result)
                except StopIteration as stop:
                    if stop.value in opened:
                        opened.remove(stop.value)  # handed to the caller (a chat stream)
                    if out is not None:
                        out.append(stop.value)
                    return
                result, error = None, None
                if isinstance(op, _Emit):
                    yield op.item
                    continue
                try:
                    result = await self._perform(op, lines)
                except httpx.HTTPError as exc:
                    error = exc
                if isinstance(op, _Send) and op.stream and result is not None:
                    opened.append(result)
        finally:
            plan.close()
            for response in opened:
                await response.aclose()

    async def _run(self, plan: Plan) -> Any:
        out: list[Any] = []
        async for _ in self._iterate(plan, out):
            raise RuntimeError("a request plan emitted items outside an iterating method")
        return out[0]

    # -- tasks -------------------------------------------------------------------------------------------------
    async def submit(self, type: str, input: Any = None, *,
                     options: Mapping[str, Any] | None = None, idempotency_key: str | None = None) -> Task:
        """See :meth:`Client.submit` (a uuid4 idempotency key is sent when none is given)."""
        return await self._run(self._submit(type, input, options, idempotency_key))

    async def get(self, task_id: str) -> Task:
        return await self._run(self._get(task_id))

    async def list_tasks(self, status: str | None = None, type: str | None = None,
                         limit: int | None = 50, cursor: str | None = None) -> TaskPage:
        return await self._run(self._list_tasks(status, type, limit, cursor))

    def iter_tasks(self, status: str | None = None, type: str | None = None,
                   *, page_size: int = 50) -> AsyncIterator[Task]:
        """See :meth:`Client.iter_tasks`; use with ``async for``."""
        return self._iterate(self._iter_tasks(status, type, page_size))

    async def cancel(self, task_id: str) -> Task:
        return await self._run(self._cancel(task_id))

    async def confirm(self, task_id: str, step: int, approve: bool = True) -> dict[str, Any]:
        return await self._run(self._confirm(task_id, step, approve))

    async def reply(self, task_id: str, step: int, text: str) -> dict[str, Any]:
        return await self._run(self._reply(task_id, step, text))

    def stream_events(self, task_id: str, *, after: int = 0) -> AsyncIterator[TaskEvent]:
        """See :meth:`Client.stream_events`; use with ``async for``."""
        return self._iterate(self._events(task_id, after, None))

    async def wait(self, task_id: str, timeout: float | None = None, *, raise_on_failure: bool = True,
                   poll_interval: float = 1.0) -> Task:
        """See :meth:`Client.wait`."""
        return await self._run(self._wait(task_id, timeout, raise_on_failure, poll_interval))

    # -- chat and sessions -------------------------------------------------------------------------------------
    async def chat(self, messages: Messages, *, session_id: str | None = None, model: str = DEFAULT_MODEL,
                   max_tokens: int | None = None, temperature: float | None = None, json_schema: Any = None,
                   images: Any = None, stream: bool = False, **extra: Any) -> ChatResult | AsyncChatStream:
        """See :meth:`Client.chat`; ``stream=True`` returns an :class:`AsyncChatStream`."""
        body = _chat_body(messages, session_id=session_id, model=model, max_tokens=max_tokens,
                          temperature=temperature, json_schema=json_schema, images=images, stream=stream,
                          extra=extra)
        result = await self._run(self._chat(body))
        return AsyncChatStream(result) if stream else result

    async def create_session(self, metadata: Mapping[str, Any] | None = None,
                             ttl_s: float | None = None) -> Session:
        return await self._run(self._create_session(metadata, ttl_s))

    async def get_session(self, session_id: str) -> Session:
        return await self._run(self._get_session(session_id))

    async def session_messages(self, session_id: str, start: int | None = None,
                               end: int | None = None) -> list[SessionMessage]:
        return await self._run(self._session_messages(session_id, start, end))

    async def upload_file(self, data: bytes | str | Path, content_type: str = "application/pdf") -> str:
        return await self._run(self._upload_file(data, content_type))

    async def download_artifact(self, task_id: str, name: str, path: str | Path | None = None) -> bytes:
        return await self._run(self._download_artifact(task_id, name, path))

    async def delete_session(self, session_id: str) -> None:
        await self._run(self._delete_session(session_id))

    async def batch_file(self, requests: Any, *, filename: str = "batch.jsonl", model: str = DEFAULT_MODEL
                         ) -> dict[str, Any]:
        return await self._run(self._batch_file(requests, filename, model))

    async def create_batch(self, input_file_id: str, *, metadata: Mapping[str, str] | None = None
                           ) -> dict[str, Any]:
        return await self._run(self._create_batch(input_file_id, metadata))

    async def get_batch(self, batch_id: str) -> dict[str, Any]:
        return await self._run(self._get_batch(batch_id))

    async def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return await self._run(self._cancel_batch(batch_id))

    async def wait_batch(self, batch_id: str, timeout: float | None = None, *, poll_s: float = 1.0,
                         on_progress: Callable[[Mapping[str, Any]], None] | None = None) -> dict[str, Any]:
        return await self._run(self._wait_batch(batch_id, timeout, poll_s, on_progress))

    async def file_content(self, file_id: str) -> bytes:
        return await self._run(self._file_content(file_id))

    async def batch_results(self, batch: Mapping[str, Any] | str) -> dict[str, dict[str, Any]]:
        return await self._run(self._batch_results(batch))

    async def health(self) -> bool:
        return await self._run(self._health())

    async def close(self) -> None:
        await self._http.aclose()

    async def aclose(self) -> None:
        await self.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
