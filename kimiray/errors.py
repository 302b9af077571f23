"""Exceptions of the kimiray SDK, and the one place that maps an HTTP error answer to them.

Callers catch by meaning (``NotFoundError``, ``RateLimitError``...) rather than by status code; every error the
SDK raises is a :class:`KimirayError`, so one ``except`` covers the lot.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import httpx

    from kimiray.types import Task


class KimirayError(Exception):
    """Base: ``status`` (HTTP, None when no answer came), ``code`` / ``message`` / ``param`` / ``type`` from the
    error body, ``request_id`` from the ``X-Request-Id`` header, ``body`` the decoded answer."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 param: str | None = None, type: str | None = None,
                 request_id: str | None = None, body: Any = None) -> None:
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.type = type
        self.request_id = request_id
        self.body = body
        super().__init__(message)

    @property
    def status_code(self) -> int | None:
        """httpx / openai spelling of ``status``."""
        return self.status

    def __str__(self) -> str:
        parts = [f"HTTP {self.status}" if self.status is not None else None,
                 f"code={self.code}" if self.code else None,
                 f"param={self.param}" if self.param else None,
                 f"request_id={self.request_id}" if self.request_id else None]
        where = ", ".join(p for p in parts if p)
        return f"{self.message} ({where})" if where else self.message


class AuthenticationError(KimirayError):
    """401/403: the API key is missing, wrong, or not allowed to do this."""


class NotFoundError(KimirayError):
    """404: no such task or session (a task of another API key reads as not found too)."""


class InvalidRequestError(KimirayError):
    """400/413/415/422: the server refused the request as written (unknown task type, bad schema, too big...)."""


class ConflictError(KimirayError):
    """409: the request clashes with the resource's state."""


class RateLimitError(KimirayError):
    """429: too many requests for this key; ``retry_after`` seconds from the server when it said."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServiceUnavailableError(KimirayError):
    """503: overloaded or not ready; ``retry_after`` seconds from the server when it said."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class ServerError(KimirayError):
    """Any other 5xx: the server failed; the request may or may not have taken effect."""


class APITimeoutError(KimirayError):
    """504 from the server, or no answer within the client's timeout."""


class ConnectionError(KimirayError):
    """The server could not be reached, or the connection broke and the retries ran out.

    The SDK's own name: it shadows ``builtins.ConnectionError`` only where imported by name
    (``APIConnectionError`` is the same class without that clash)."""


APIConnectionError = ConnectionError  # an alias that does not shadow the builtin on ``from ... import *``


class TaskFailedError(KimirayError):
    """``wait()`` saw the task end ``failed``; ``task`` is the final Task (``task.error`` says why)."""

    def __init__(self, task: Task) -> None:
        info = task.error
        message = f"task {task.id} failed: {info.message if info else 'no error detail'}"
        super().__init__(message, code=info.code if info else None)
        self.task = task


class TaskCancelledError(KimirayError):
    """``wait()`` saw the task end ``cancelled``; ``task`` is the final Task."""

    def __init__(self, task: Task) -> None:
        super().__init__(f"task {task.id} was cancelled", code="cancelled")
        self.task = task


class WaitTimeoutError(KimirayError):
    """``wait()`` ran out of time; the task goes on. ``task`` is the last state seen (``None`` if none was)."""

    def __init__(self, task_id: str, timeout: float | None, task: Task | None = None) -> None:
        status = task.status if task is not None else "unknown"
        super().__init__(f"task {task_id} still {status} after {timeout}s", code="wait_timeout")
        self.task_id = task_id
        self.timeout = timeout
        self.task = task


# How a 401 is fixed from the client side (SDK, CLI and LangChain all read the same variable).
AUTH_HINT = ("Pass the server's key: api_key=... (SDK, ChatKimiVL), --api-key (CLI), or set KIMIRAY_API_KEY; "
             "the server's keys are its KIMIRAY_API_KEYS.")

_BY_STATUS: dict[int, type[KimirayError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 403: AuthenticationError, 404: NotFoundError,
    409: ConflictError, 413: InvalidRequestError, 415: InvalidRequestError, 422: InvalidRequestError,
    429: RateLimitError, 503: ServiceUnavailableError, 504: APITimeoutError,
}
# An error inside a 200 stream has no status of its own; its OpenAI ``type`` says which it would have been.
_STATUS_BY_TYPE = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403, "not_found_error": 404,
    "conflict_error": 409, "rate_limit_error": 429, "service_unavailable_error": 503, "timeout_error": 504,
    "server_error": 500,
}


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not headers:
        return None
    value = (headers.get("retry-after") or headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when is not None else None


def error_for(status: int | None, body: Any, *, headers: Mapping[str, str] | None = None,
              fallback: str = "") -> KimirayError:
    """The exception for an error answer: ``status`` picks the class (or the body's ``type`` when status is
    None, as for an error event in a stream); the OpenAI ``{"error": {...}}`` body fills the fields."""
    err = body.get("error") if isinstance(body, Mapping) else None
    fields: dict[str, Any] = {}
    if isinstance(err, Mapping):
        message = str(err.get("message") or fallback or "error")
        fields = {"code": err.get("code"), "param": err.get("param"), "type": err.get("type")}
    elif isinstance(err, str):
        message = err
    elif isinstance(body, Mapping) and "detail" in body:  # a bare FastAPI / Starlette answer
        message = str(body["detail"])
    else:
        message = fallback or (f"HTTP {status}" if status is not None else "error")
    if status is None:
        status = _STATUS_BY_TYPE.get(str(fields.get("type")), 500)
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else KimirayError)
    request_id = headers.get("x-request-id") if headers else None
    kwargs: dict[str, Any] = dict(status=status, request_id=request_id, body=body, **fields)
    if cls in (RateLimitError, ServiceUnavailableError):
        kwargs["retry_after"] = parse_retry_after(headers)
    if status == 401:
        message = f"{message} {AUTH_HINT}"
    return cls(message, **kwargs)


def error_from_response(response: httpx.Response) -> KimirayError:
    """Map an httpx answer with a 4xx/5xx status; the body must have been read already."""
    text = response.text
    try:
        body: Any = json.loads(text) if text else None
    except ValueError:
        body = None
    fallback = text.strip()[:500] or response.reason_phrase or f"HTTP {response.status_code}"
    return error_for(response.status_code, body, headers=response.headers, fallback=fallback)
