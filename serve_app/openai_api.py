"""OpenAI Chat Completions wire format for kimiray: builders for responses, stream chunks, model lists and
error bodies. The request schema and its conversion to the engine live in ``connectors.openai_messages`` (the
``chat`` task uses them too); they are re-exported here for the ingress.

Responses: :func:`completion_response` (``chat.completion``; Thinking reasoning in
``choices[0].message.reasoning_content`` like vLLM / DeepSeek), :func:`chunk` / :func:`usage_chunk` /
:class:`ChunkStream` (``chat.completion.chunk``), :func:`models_response`, :func:`error_body` (OpenAI error
format). Finish reasons: the engine's ``stop`` / ``length`` are passed through; ``cancelled`` (client gone)
and ``error`` are NOT mapped (:func:`map_finish_reason` returns None) - the caller answers them: a non-stream
request with an ``error`` becomes a 500 :func:`error_body`; in a stream the caller sends an error event
(``data: {"error": ...}``) and stops without ``[DONE]``; for ``cancelled`` nothing is sent.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from connectors.media import MediaError
from connectors.openai_messages import (
    AssistantMessage,
    ChatCompletionRequest,
    ImageURL,
    ImageUrlPart,
    JsonSchemaFormat,
    RequestError,
    ResponseFormat,
    StreamOptions,
    SystemMessage,
    TextPart,
    UserMessage,
    VideoPart,
    VideoSpec,
    VideoURL,
    VideoUrlPart,
    to_generate_request,
)
from engine.runtime.request import Delta, TokenLogprob, Usage

__all__ = [
    "RequestError",
    "TextPart",
    "ImageURL",
    "ImageUrlPart",
    "VideoSpec",
    "VideoPart",
    "VideoURL",
    "VideoUrlPart",
    "SystemMessage",
    "UserMessage",
    "AssistantMessage",
    "ResponseFormat",
    "JsonSchemaFormat",
    "StreamOptions",
    "ChatCompletionRequest",
    "new_request_id",
    "to_generate_request",
    "map_finish_reason",
    "usage_dict",
    "format_logprobs",
    "completion_response",
    "chunk",
    "usage_chunk",
    "ChunkStream",
    "sse_event",
    "SSE_DONE",
    "models_response",
    "error_body",
    "error_type",
    "error_from_exception",
]

TokenBytes = Callable[[int], bytes]


# ----------------------------------------------------------------------------------------------------------
# Request ids
# ----------------------------------------------------------------------------------------------------------
def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------
def map_finish_reason(reason: str | None) -> str | None:
    """Engine finish reason -> OpenAI: ``stop`` / ``length`` as is; ``cancelled`` / ``error`` / None -> None
    (the caller handles them, see the module docstring)."""
    return reason if reason in ("stop", "length") else None


def usage_dict(usage: Usage | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Engine ``Usage`` -> OpenAI ``usage`` (with ``prompt_tokens_details.cached_tokens``)."""
    if usage is None:
        return None
    if isinstance(usage, Mapping):
        usage = Usage(**{k: usage[k] for k in ("prompt_tokens", "completion_tokens", "cached_tokens") if k in usage})
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _token_entry(token_id: int, logprob: float, token_bytes: TokenBytes | None,
                 known: bytes | None = None) -> dict[str, Any]:
    """``known``: bytes the engine attached; else ``token_bytes``; else the token reads ``token_id:<id>``."""
    if known is None and token_bytes is None:
        return {"token": f"token_id:{token_id}", "logprob": float(logprob), "bytes": None}
    raw = bytes(known) if known is not None else bytes(token_bytes(int(token_id)))
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": float(logprob), "bytes": list(raw)}


def format_logprobs(items: Sequence[TokenLogprob | Mapping[str, Any]] | None,
                    token_bytes: TokenBytes | None = None) -> list[dict[str, Any]] | None:
    """Engine ``TokenLogprob`` list -> OpenAI ``logprobs.content`` entries. ``token_bytes`` (e.g.
    ``KimiTokenizer.token_bytes``) gives each token's bytes; without it tokens read ``token_id:<id>``."""
    if items is None:
        return None
    out = []
    for it in items:
        it = it if isinstance(it, TokenLogprob) else TokenLogprob.model_validate(it)
        entry = _token_entry(it.token_id, it.logprob, token_bytes, it.token_bytes)
        top_bytes = it.top_bytes if it.top_bytes is not None and len(it.top_bytes) == len(it.top) else None
        entry["top_logprobs"] = [
            _token_entry(t, lp, token_bytes, top_bytes[k] if top_bytes else None) for k, (t, lp) in enumerate(it.top)
        ]
        out.append(entry)
    return out


def _logprobs_obj(logprobs: Sequence[Any] | None, token_bytes: TokenBytes | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    if logprobs and isinstance(logprobs[0], Mapping) and "token" in logprobs[0]:
        content = list(logprobs)  # already formatted
    else:
        content = format_logprobs(logprobs, token_bytes)
    return {"content": content, "refusal": None}


def completion_response(
    request_id: str,
    model: str,
    text: str,
    reasoning: str | None,
    finish_reason: str,
    usage: Usage | Mapping[str, Any] | None,
    logprobs: Sequence[TokenLogprob | Mapping[str, Any]] | None = None,
    *,
    created: int | None = None,
    token_bytes: TokenBytes | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` object. ``reasoning`` (Thinking models) goes to ``message.reasoning_content``
    (key present only when ``reasoning`` is non-empty). ``logprobs``: engine ``TokenLogprob`` items (formatted
    with ``token_bytes``) or already formatted OpenAI entries; None -> ``"logprobs": null``."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning:
        message["reasoning_content"] = reasoning
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()) if created is None else int(created),
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": _logprobs_obj(logprobs, token_bytes),
            "finish_reason": finish_reason,
        }],
    }
    u = usage_dict(usage)
    if u is not None:
        body["usage"] = u
    return body


def chunk(
    request_id: str,
    model: str,
    created: int,
    *,
    role: str | None = None,
    content: str | None = None,
    reasoning: str | None = None,
    finish_reason: str | None = None,
    logprobs: Sequence[TokenLogprob | Mapping[str, Any]] | None = None,
    token_bytes: TokenBytes | None = None,
    include_usage: bool = False,
    usage: Usage | Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` with one choice. ``delta`` holds only the keys given (``role``,
    ``content``, ``reasoning_content``); ``include_usage`` adds ``"usage": null`` as OpenAI does on every
    chunk but the usage one when ``stream_options.include_usage`` is set. Given ``usage``, it is instead the
    final usage chunk (empty ``choices``; same as :func:`usage_chunk`) and the other arguments are ignored."""
    if usage is not None:
        return usage_chunk(request_id, model, created, usage)
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = _logprobs_obj(logprobs, token_bytes)
    body: dict[str, Any] = {
        "id": request_id, "object": "chat.completion.chunk", "created": int(created), "model": model,
        "choices": [choice],
    }
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(request_id: str, model: str, created: int, usage: Usage | Mapping[str, Any]) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage``: no choices, the request's usage."""
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(created), "model": model,
            "choices": [], "usage": usage_dict(usage)}


class ChunkStream:
    """Engine ``Delta`` stream -> ``chat.completion.chunk`` dicts.

    ``feed(delta)`` returns the chunks to send for it: the role chunk first (``{"role": "assistant",
    "content": ""}``), then a content / reasoning chunk when the delta carries text (or logprobs), and on the
    final delta (``stop`` / ``length``) a chunk with an empty delta and the finish reason, followed by the usage
    chunk when ``include_usage``. A delta finishing with ``cancelled`` / ``error`` yields only its text; the
    caller reads ``failed`` / ``error`` and ends the stream itself (see the module docstring).
    """

    def __init__(self, request_id: str, model: str, *, include_usage: bool = False, logprobs: bool = False,
                 token_bytes: TokenBytes | None = None, created: int | None = None) -> None:
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.token_bytes = token_bytes
        self.created = int(time.time()) if created is None else int(created)
        self.started = False
        self.finish_reason: str | None = None
        self.failed: str | None = None
        self.error: str | None = None
        self.usage: Usage | None = None

    def _chunk(self, **kw: Any) -> dict[str, Any]:
        return chunk(self.request_id, self.model, self.created, include_usage=self.include_usage,
                     token_bytes=self.token_bytes, **kw)

    def start(self) -> list[dict[str, Any]]:
        if self.started:
            return []
        self.started = True
        return [self._chunk(role="assistant", content="")]

    def feed(self, delta: Delta) -> list[dict[str, Any]]:
        out = self.start()
        lp = delta.logprobs if self.logprobs else None
        if delta.text or delta.reasoning_text or lp:
            out.append(self._chunk(
                content=delta.text if delta.text or not delta.reasoning_text else None,
                reasoning=delta.reasoning_text or None,
                logprobs=lp if lp else None,
            ))
        if delta.usage is not None:
            self.usage = delta.usage
        if delta.finish_reason is not None:
            mapped = map_finish_reason(delta.finish_reason)
            if mapped is None:
                self.failed = delta.finish_reason
                self.error = delta.error
                return out
            self.finish_reason = mapped
            out.append(self._chunk(finish_reason=mapped))
            if self.include_usage:
                out.append(usage_chunk(self.request_id, self.model, self.created,
                                       self.usage or Usage(prompt_tokens=0, completion_tokens=0)))
        return out


def sse_event(obj: Mapping[str, Any]) -> str:
    """One server-sent event line pair for ``obj``."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def models_response(names: Sequence[str], *, created: int | None = None, owned_by: str = "kimiray") -> dict[str, Any]:
    """``GET /v1/models`` body."""
    ts = int(time.time()) if created is None else int(created)
    return {"object": "list",
            "data": [{"id": n, "object": "model", "created": ts, "owned_by": owned_by} for n in names]}


_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
    422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
    504: "timeout_error",
}


def error_type(status: int) -> str:
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, code: str | None, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI error format: ``{"error": {"message", "type", "param", "code"}}``; ``type`` follows ``status``."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out


def error_from_exception(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, OpenAI error body) for the input errors this module and the engine raise:
    ``MediaError`` / ``RequestError`` (their status, code, param), pydantic ``ValidationError`` (422, first
    error's location as ``param``), the engine's ``ProcessorError`` / ``ChatTemplateError`` (400). Anything
    else -> 500 ``internal_error`` without details."""
    if isinstance(exc, (MediaError, RequestError)):
        return exc.status_code, error_body(exc.status_code, exc.code, exc.message, exc.param)
    if isinstance(exc, ValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": str(exc)}
        param = _loc(first.get("loc", ())) or None
        msg = "; ".join(f"{_loc(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errs[:5])
        return 422, error_body(422, "invalid_value", msg, param)
    from engine.processor import ProcessorError  # local: keeps this module light to import
    from engine.tokenizer import ChatTemplateError

    if isinstance(exc, (ProcessorError, ChatTemplateError)):
        return 400, error_body(400, "invalid_input", str(exc), "messages")
    return 500, error_body(500, "internal_error", "internal server error")
