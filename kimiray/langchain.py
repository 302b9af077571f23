"""LangChain chat model for a kimiray server (Kimi-VL behind an OpenAI-compatible API).

:class:`ChatKimiVL` is a ``langchain_core`` 1.x ``BaseChatModel`` that talks to ``POST {base_url}/chat/completions``
with ``httpx`` directly (sync and async), so it needs nothing beyond ``langchain-core`` and ``httpx``::

    from kimiray.langchain import ChatKimiVL

    llm = ChatKimiVL(base_url="http://127.0.0.1:8000/v1", api_key="sk-...", temperature=0, max_tokens=256)
    llm.invoke("Hello")
    llm.invoke([HumanMessage(content=[
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image", "base64": png_b64, "mime_type": "image/png"},   # LangChain v1 standard block
        # or {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}  (OpenAI part)
    ])])
    for chunk in llm.stream("Tell me a story"): ...
    llm.with_structured_output(Person).invoke("Give me a person")   # guided decoding on the server

Messages: ``SystemMessage`` -> ``system``, ``HumanMessage`` -> ``user``, ``AIMessage`` -> ``assistant`` (text only;
reasoning blocks and ``additional_kwargs["reasoning_content"]`` are not sent back, the server would drop them
anyway), ``ChatMessage`` with role system / developer / user / assistant. Tool calls and ``ToolMessage`` are
refused (``ValueError``): the server has no tool calling.

Content parts of a user message: strings, ``{"type": "text"}``, OpenAI ``{"type": "image_url", "image_url":
{"url"} | "url"}``, LangChain v1 ``{"type": "image", "url" | "base64" (+ "mime_type")}`` (v0 blocks with
``source_type`` are accepted too), LangChain ``{"type": "video", "url" | "base64"}`` (sent as ``video_url``, which
the server decodes only when it has PyAV) and the server's own ``{"type": "video", "video": {"frames": [...]}}`` /
``{"type": "video_url"}`` parts (passed through).

Output: ``AIMessage.content`` is the answer text; the server's ``reasoning_content`` (Thinking models) goes to
``additional_kwargs["reasoning_content"]``; ``usage_metadata`` has ``input_tokens`` / ``output_tokens`` /
``total_tokens`` (+ ``input_token_details.cache_read`` = prefix-cache hits); ``response_metadata`` has
``finish_reason``, ``model_name`` and ``model_provider`` ("kimiray"). Streaming asks for ``stream_options.
include_usage`` and puts usage, finish reason and model name on the LAST chunk (``chunk_position="last"``).

Errors: an HTTP error answer raises :class:`KimiVLAPIError` (``status``, ``code``, ``message``, ``param``,
``request_id``), as does an error event inside a stream; a connection that cannot be made raises
:class:`KimiVLConnectionError` (a subclass, ``status`` None). 429 and 503 answers (and failed connects) are
retried up to ``max_retries`` times, waiting ``Retry-After`` (seconds or an HTTP date) when given, else
0.5 s, 1 s, 2 s, ...; every wait is capped at ``max_retry_wait`` seconds. A stream is only retried before its
first byte.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Literal

import httpx
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.utils import from_env, secret_from_env
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr

__all__ = ["ChatKimiVL", "KimiVLAPIError", "KimiVLConnectionError", "convert_message", "structured_response_format"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
RETRY_STATUSES = frozenset({429, 503})
PROVIDER = "kimiray"
_USER_AGENT = "kimiray-langchain/0.1"
# OpenAI error "type" -> status, for error events inside a stream (they carry no HTTP status of their own)
_TYPE_STATUS = {
    "authentication_error": 401, "permission_error": 403, "not_found_error": 404, "rate_limit_error": 429,
    "service_unavailable_error": 503, "timeout_error": 504, "server_error": 500, "invalid_request_error": 400,
}


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------
class KimiVLAPIError(Exception):
    """An error answer from the server: HTTP ``status``, OpenAI error ``code`` and ``message``.

    ``status`` is None for :class:`KimiVLConnectionError`; for an error event inside a stream (the HTTP answer
    was already 200) it is derived from the error's ``type`` (``server_error`` -> 500, ...)."""

    def __init__(self, status: int | None, code: str | None, message: str, *, param: str | None = None,
                 type: str | None = None, request_id: str | None = None, body: Any = None) -> None:  # noqa: A002
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type
        self.request_id = request_id
        self.body = body
        where = f"HTTP {status}" if status is not None else "no HTTP answer"
        super().__init__(f"kimiray API error ({where}, code={code!r}): {message}")

    @property
    def status_code(self) -> int | None:  # httpx / openai spelling
        return self.status


class KimiVLConnectionError(KimiVLAPIError):
    """The server could not be reached (connect failure or connect timeout), after the retries."""

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(None, "connection_error", message)
        self.__cause__ = cause


def _error_from_body(status: int | None, body: Any, *, request_id: str | None = None,
                     fallback: str = "") -> KimiVLAPIError:
    err = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(err, Mapping):
        message = str(err.get("message") or fallback or "error")
        return KimiVLAPIError(status, err.get("code"), message, param=err.get("param"), type=err.get("type"),
                              request_id=request_id, body=body)
    if isinstance(err, str):
        return KimiVLAPIError(status, None, err, request_id=request_id, body=body)
    if isinstance(body, Mapping) and "detail" in body:  # a bare FastAPI / Starlette error
        return KimiVLAPIError(status, None, str(body["detail"]), request_id=request_id, body=body)
    return KimiVLAPIError(status, None, fallback or f"HTTP {status}", request_id=request_id, body=body)


def _error_from_response(response: httpx.Response) -> KimiVLAPIError:
    text = response.text
    try:
        body: Any = json.loads(text)
    except ValueError:
        body = None
    fallback = text.strip()[:500] or (response.reason_phrase or f"HTTP {response.status_code}")
    return _error_from_body(response.status_code, body, request_id=response.headers.get("x-request-id"),
                            fallback=fallback)


def _retry_after(headers: httpx.Headers) -> float | None:
    from kimiray.errors import parse_retry_after

    return parse_retry_after(headers)


# ------------------------------------------------------------------------------------------------------------
# Messages -> OpenAI chat messages
# ------------------------------------------------------------------------------------------------------------
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


def _sniff_image_type(b64: str) -> str:
    """Media type of base64 image data from its magic bytes; '' (no declared type) when unknown."""
    try:
        head = base64.b64decode("".join(b64[:32].split()) + "=" * (-len(b64[:32]) % 4))
    except (binascii.Error, ValueError):
        return ""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in _MAGIC:
        if head.startswith(magic):
            return mime
    return ""


def _data_url(b64: str, mime_type: str | None, kind: str) -> str:
    if b64.startswith("data:"):
        return b64
    mime = mime_type or (_sniff_image_type(b64) if kind == "image" else "")
    return f"data:{mime};base64,{b64}"


def _image_part(url: str, detail: str | None = None) -> dict[str, Any]:
    image_url: dict[str, Any] = {"url": url}
    if detail:
        image_url["detail"] = detail
    return {"type": "image_url", "image_url": image_url}


def _convert_part(part: Any, role: str) -> dict[str, Any] | None:
    """One content part -> an OpenAI part (None: drop it)."""
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, Mapping):
        raise ValueError(f"unsupported content part {part!r} in a {role} message")
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": str(part.get("text", ""))}
    if role == "assistant" and kind in ("reasoning", "thinking", "redacted_thinking"):
        return None  # earlier reasoning is not re-sent (the server drops it too)
    if role != "user":
        raise ValueError(f"{role} messages may only hold text; got a {kind!r} part")
    if kind == "image_url":
        ref = part.get("image_url")
        if isinstance(ref, Mapping):
            if not ref.get("url"):
                raise ValueError("image_url part without a url")
            return _image_part(str(ref["url"]), ref.get("detail"))
        if isinstance(ref, str) and ref:
            return _image_part(ref)
        raise ValueError(f"invalid image_url part: {part!r}")
    if kind in ("image", "video") and not (kind == "video" and "video" in part):
        source = part.get("source_type")  # LangChain v0 blocks (normally already upgraded by langchain-core)
        url = part.get("url") if source in (None, "url") else None
        b64 = part.get("base64") or (part.get("data") if source == "base64" else None)
        if url:
            ref = str(url)
        elif b64:
            ref = _data_url(str(b64), part.get("mime_type"), kind)
        elif part.get("file_id") or source == "id":
            raise ValueError(f"{kind} blocks by file_id are not supported by kimiray; send a url or base64 data")
        else:
            raise ValueError(f"{kind} block needs 'url' or 'base64': {part!r}")
        if kind == "image":
            return _image_part(ref, part.get("detail"))
        return {"type": "video_url", "video_url": {"url": ref}}
    if kind in ("video", "video_url"):  # the server's own video parts
        return dict(part)
    raise ValueError(f"content part type {kind!r} is not supported by kimiray (text, images and video only)")


def _convert_content(content: Any, role: str) -> str | list[dict[str, Any]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = [p for p in (_convert_part(item, role) for item in content) if p is not None]
    if role != "user" and all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)  # plain text is the most portable form for system / assistant
    return parts


_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant", "system": "system",
          "developer": "system"}


def convert_message(message: BaseMessage) -> dict[str, Any]:
    """A LangChain message -> an OpenAI chat message for kimiray (raises ValueError for what the server lacks)."""
    if isinstance(message, (ToolMessage, FunctionMessage)):
        raise ValueError("kimiray has no tool calling: tool / function messages cannot be sent")
    if isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        if message.tool_calls or message.additional_kwargs.get("tool_calls"):
            raise ValueError("kimiray has no tool calling: AI messages with tool calls cannot be sent")
        role = "assistant"
    elif isinstance(message, ChatMessage):
        role = _ROLES.get(message.role.lower())
        if role is None:
            raise ValueError(f"unsupported chat message role {message.role!r}")
    else:
        raise ValueError(f"unsupported message type {type(message).__name__}")
    out: dict[str, Any] = {"role": role, "content": _convert_content(message.content, role)}
    if message.name and role != "system":
        out["name"] = message.name
    return out


# ------------------------------------------------------------------------------------------------------------
# Responses
# ------------------------------------------------------------------------------------------------------------
def _usage_metadata(usage: Mapping[str, Any] | None) -> UsageMetadata | None:
    if not usage:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    meta = UsageMetadata(input_tokens=prompt, output_tokens=completion,
                         total_tokens=int(usage.get("total_tokens") or prompt + completion))
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        meta["input_token_details"] = {"cache_read": int(cached)}
    return meta


class _SSEDecoder:
    """Server-sent events -> the ``data`` of each event (multi-line data joined with newlines)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None  # comment / keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


class _StreamState:
    """Turns ``chat.completion.chunk`` events into ``ChatGenerationChunk`` s; holds the tail metadata."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id: str | None = None
        self.finish_reason: str | None = None
        self.usage: Mapping[str, Any] | None = None
        self.done = False

    def event(self, data: str, request_id: str | None) -> list[ChatGenerationChunk]:
        if data.strip() == "[DONE]":
            self.done = True
            return []
        try:
            obj = json.loads(data)
        except ValueError:
            raise KimiVLAPIError(None, "invalid_stream", f"undecodable stream event: {data[:200]!r}",
                                 request_id=request_id) from None
        if not isinstance(obj, Mapping):
            return []
        if obj.get("error") is not None:
            err = obj["error"]
            status = _TYPE_STATUS.get(err.get("type"), 500) if isinstance(err, Mapping) else 500
            raise _error_from_body(status, obj, request_id=request_id, fallback="error in stream")
        self.id = self.id or obj.get("id")
        self.model = obj.get("model") or self.model
        if obj.get("usage"):
            self.usage = obj["usage"]
        out = []
        for choice in obj.get("choices") or []:
            delta = choice.get("delta") or {}
            content = delta.get("content") or ""
            reasoning = delta.get("reasoning_content")
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            if content or reasoning:
                kwargs = {"reasoning_content": reasoning} if reasoning else {}
                info = {"logprobs": choice["logprobs"]} if choice.get("logprobs") else None
                out.append(ChatGenerationChunk(
                    message=AIMessageChunk(content=content, additional_kwargs=kwargs, id=self.id),
                    generation_info=info,
                ))
        return out

    def final(self, request_id: str | None) -> ChatGenerationChunk:
        if not self.done and self.finish_reason is None:
            raise KimiVLAPIError(None, "incomplete_stream", "the stream ended before the answer finished",
                                 request_id=request_id)
        meta = {"finish_reason": self.finish_reason, "model_name": self.model, "model_provider": PROVIDER}
        return ChatGenerationChunk(
            message=AIMessageChunk(content="", id=self.id, usage_metadata=_usage_metadata(self.usage),
                                   response_metadata=meta, chunk_position="last"),
            generation_info={"finish_reason": self.finish_reason, "model_name": self.model},
        )


# ------------------------------------------------------------------------------------------------------------
# Structured output
# ------------------------------------------------------------------------------------------------------------
def _schema_name(name: Any) -> str:
    cleaned = re.sub(r"[^a-zA-Z0-9_-]+", "_", str(name or "")).strip("_")[:64]
    return cleaned or "response"


def _close_objects(schema: Any) -> Any:
    """Copy of a JSON schema with ``additionalProperties: false`` on every object schema that does not say."""
    if isinstance(schema, list):
        return [_close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _close_objects(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _is_pydantic_class(schema: Any) -> bool:
    return isinstance(schema, type) and issubclass(schema, BaseModel)


def structured_response_format(schema: Any, method: str = "json_schema") -> dict[str, Any]:
    """The ``response_format`` for ``schema``: a pydantic class (object schemas closed with
    ``additionalProperties: false`` unless the model allows extra fields), a JSON-schema dict (sent as is;
    an OpenAI ``{"name", "schema"}`` / ``{"type": "json_schema", "json_schema": ...}`` / function
    ``{"name", "parameters"}`` dict is unwrapped), or a TypedDict / function (via langchain-core)."""
    if method == "json_mode":
        return {"type": "json_object"}
    if method != "json_schema":
        raise ValueError(f"method must be 'json_schema' or 'json_mode' (kimiray has no function calling), got {method!r}")
    if _is_pydantic_class(schema):
        body = schema.model_json_schema()
        if schema.model_config.get("extra") != "allow":
            body = _close_objects(body)
        return {"type": "json_schema", "json_schema": {"name": _schema_name(schema.__name__), "schema": body,
                                                       "strict": True}}
    if isinstance(schema, Mapping):
        if schema.get("type") == "json_schema" and isinstance(schema.get("json_schema"), Mapping):
            return {"type": "json_schema", "json_schema": dict(schema["json_schema"])}
        if isinstance(schema.get("schema"), Mapping) and "properties" not in schema:
            spec = dict(schema)
            spec["name"] = _schema_name(spec.get("name") or spec["schema"].get("title"))
            return {"type": "json_schema", "json_schema": spec}
        if "name" in schema and isinstance(schema.get("parameters"), Mapping):
            spec = {"name": _schema_name(schema["name"]), "schema": dict(schema["parameters"])}
            if schema.get("description"):
                spec["description"] = schema["description"]
            return {"type": "json_schema", "json_schema": spec}
        return {"type": "json_schema", "json_schema": {"name": _schema_name(schema.get("title")), "schema": dict(schema)}}
    from langchain_core.utils.function_calling import convert_to_json_schema

    body = convert_to_json_schema(schema)
    return {"type": "json_schema", "json_schema": {"name": _schema_name(body.get("title")), "schema": body}}


def _message_text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    return "".join(p if isinstance(p, str) else str(p.get("text", "")) for p in content
                   if isinstance(p, str) or (isinstance(p, Mapping) and p.get("type") == "text"))


def _structured_parser(schema: Any):
    def parse(message: BaseMessage) -> Any:
        text = _message_text(message)
        finish = message.response_metadata.get("finish_reason")
        try:
            value = json.loads(text)
        except ValueError as exc:
            hint = " (the answer hit max_tokens: raise max_tokens)" if finish == "length" else ""
            raise OutputParserException(f"the model's answer is not valid JSON{hint}: {exc}", llm_output=text) from exc
        if _is_pydantic_class(schema):
            try:
                return schema.model_validate(value)
            except Exception as exc:  # pydantic.ValidationError
                raise OutputParserException(f"the model's answer does not validate as {schema.__name__}: {exc}",
                                            llm_output=text) from exc
        return value

    return parse


# ------------------------------------------------------------------------------------------------------------
# The chat model
# ------------------------------------------------------------------------------------------------------------
class ChatKimiVL(BaseChatModel):
    """Kimi-VL served by kimiray (or any OpenAI-compatible ``/chat/completions`` endpoint with the same
    extensions). See the module docstring for messages, output, streaming and errors."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    base_url: str = Field(default_factory=from_env("KIMIRAY_BASE_URL", default=DEFAULT_BASE_URL))
    """API root including ``/v1`` (env ``KIMIRAY_BASE_URL``)."""
    api_key: SecretStr | None = Field(default_factory=secret_from_env("KIMIRAY_API_KEY", default=None))
    """Bearer key (env ``KIMIRAY_API_KEY``); None sends no Authorization header."""
    model: str = Field(default="kimi-vl", alias="model_name")
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    seed: int | None = None
    timeout: float | None = 120.0
    """Seconds for connect / each read (a stream's reads are per chunk); None: no limit."""
    max_retries: int = Field(default=2, ge=0)
    """Retries of 429 / 503 answers and failed connects."""
    max_retry_wait: float = Field(default=30.0, ge=0)
    """Cap, in seconds, on each wait between retries (``Retry-After`` included)."""
    extra_body: dict[str, Any] | None = None
    """Extra request fields (e.g. ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``)."""
    default_headers: dict[str, str] | None = None
    streaming: bool = False
    """Stream under ``invoke`` as well (tokens reach callbacks as they come)."""
    http_client: httpx.Client | None = Field(default=None, exclude=True)
    """Your own sync client (not closed by this object); its base URL is not used."""
    http_async_client: httpx.AsyncClient | None = Field(default=None, exclude=True)
    """Your own async client (not closed by this object); without one a client is made per call."""

    _client: httpx.Client | None = PrivateAttr(default=None)
    _ssl_context: ssl.SSLContext | None = PrivateAttr(default=None)

    # -- LangChain plumbing ------------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "kimiray-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "base_url": self.base_url, "temperature": self.temperature,
                "top_p": self.top_p, "max_tokens": self.max_tokens, "stop": self.stop, "seed": self.seed,
                "extra_body": self.extra_body}

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": "KIMIRAY_API_KEY"}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=PROVIDER, ls_model_name=kwargs.get("model", self.model),
                                 ls_model_type="chat")
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # -- request building ------------------------------------------------------------------------------------
    def _payload(self, messages: list[BaseMessage], stop: list[str] | None, stream: bool,
                 kwargs: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        for key in ("stream", "stream_options", "ls_structured_output_format"):
            kwargs.pop(key, None)
        extra = kwargs.pop("extra_body", None) or {}
        payload: dict[str, Any] = {"model": self.model, "messages": [convert_message(m) for m in messages]}
        for name in ("temperature", "top_p", "max_tokens", "seed"):
            value = getattr(self, name)
            if value is not None:
                payload[name] = value
        stops = stop if stop is not None else self.stop
        if stops:
            payload["stop"] = list(stops)
        payload.update(self.extra_body or {})
        payload.update(extra)
        payload.update(kwargs)
        rf = payload.get("response_format")
        if rf is not None and not isinstance(rf, Mapping):
            payload["response_format"] = structured_response_format(rf)  # a pydantic class / TypedDict
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return payload

    def _headers(self, stream: bool) -> dict[str, str]:
        headers = {"User-Agent": _USER_AGENT, "Accept": "text/event-stream" if stream else "application/json"}
        if self.api_key is not None and self.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        headers.update(self.default_headers or {})
        return headers

    @property
    def _url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def _httpx_timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout)

    def _verify(self) -> ssl.SSLContext:
        if self._ssl_context is None:  # made once: building an SSL context per client costs milliseconds
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _sync_client(self) -> httpx.Client:
        if self.http_client is not None:
            return self.http_client
        if self._client is None:
            self._client = httpx.Client(timeout=self._httpx_timeout(), verify=self._verify())
        return self._client

    def close(self) -> None:
        """Close the sync client this object made (not one passed in as ``http_client``)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _wait(self, attempt: int, response: httpx.Response | None) -> float:
        delay = _retry_after(response.headers) if response is not None else None
        if delay is None:
            delay = 0.5 * 2**attempt
        return min(delay, self.max_retry_wait)

    # -- HTTP with retries ----------------------------------------------------------------------------------
    def _send(self, payload: dict[str, Any], stream: bool) -> httpx.Response:
        client = self._sync_client()
        attempt = 0
        while True:
            request = client.build_request("POST", self._url, json=payload, headers=self._headers(stream),
                                           timeout=self._httpx_timeout())
            try:
                response = client.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt >= self.max_retries:
                    raise KimiVLConnectionError(f"cannot reach {self._url}: {exc}", cause=exc) from exc
                time.sleep(self._wait(attempt, None))
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            try:
                response.read()
                error = _error_from_response(response)
            finally:
                response.close()
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                time.sleep(self._wait(attempt, response))
                attempt += 1
                continue
            raise error

    async def _asend(self, client: httpx.AsyncClient, payload: dict[str, Any], stream: bool) -> httpx.Response:
        attempt = 0
        while True:
            request = client.build_request("POST", self._url, json=payload, headers=self._headers(stream),
                                           timeout=self._httpx_timeout())
            try:
                response = await client.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt >= self.max_retries:
                    raise KimiVLConnectionError(f"cannot reach {self._url}: {exc}", cause=exc) from exc
                await asyncio.sleep(self._wait(attempt, None))
                attempt += 1
                continue
            if response.status_code < 400:
                return response
            try:
                await response.aread()
                error = _error_from_response(response)
            finally:
                await response.aclose()
            if response.status_code in RETRY_STATUSES and attempt < self.max_retries:
                await asyncio.sleep(self._wait(attempt, response))
                attempt += 1
                continue
            raise error

    def _async_client(self) -> tuple[httpx.AsyncClient, bool]:
        """(client, owned): a per-call client unless one was given (async clients are bound to their loop)."""
        if self.http_async_client is not None:
            return self.http_async_client, False
        return httpx.AsyncClient(timeout=self._httpx_timeout(), verify=self._verify()), True

    # -- results ------------------------------------------------------------------------------------------
    def _chat_result(self, response: httpx.Response) -> ChatResult:
        try:
            body = response.json()
        except ValueError:
            raise KimiVLAPIError(response.status_code, "invalid_response",
                                 f"the server's answer is not JSON: {response.text[:200]!r}") from None
        if not isinstance(body, Mapping) or not body.get("choices"):
            raise _error_from_body(response.status_code, body, request_id=response.headers.get("x-request-id"),
                                   fallback="the server's answer has no choices")
        choice = body["choices"][0]
        message = choice.get("message") or {}
        additional: dict[str, Any] = {}
        if message.get("reasoning_content"):
            additional["reasoning_content"] = message["reasoning_content"]
        model_name = body.get("model") or self.model
        finish_reason = choice.get("finish_reason")
        usage = body.get("usage")
        ai = AIMessage(
            content=message.get("content") or "",
            additional_kwargs=additional,
            response_metadata={"finish_reason": finish_reason, "model_name": model_name,
                               "model_provider": PROVIDER},
            usage_metadata=_usage_metadata(usage),
            id=body.get("id"),
        )
        info: dict[str, Any] = {"finish_reason": finish_reason}
        if choice.get("logprobs"):
            info["logprobs"] = choice["logprobs"]
        return ChatResult(generations=[ChatGeneration(message=ai, generation_info=info)],
                          llm_output={"token_usage": usage, "model_name": model_name})

    # -- BaseChatModel hooks -------------------------------------------------------------------------------
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        payload = self._payload(messages, stop, False, kwargs)
        response = self._send(payload, stream=False)
        try:
            return self._chat_result(response)
        finally:
            response.close()

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        payload = self._payload(messages, stop, False, kwargs)
        client, owned = self._async_client()
        try:
            response = await self._asend(client, payload, stream=False)
            try:
                return self._chat_result(response)
            finally:
                await response.aclose()
        finally:
            if owned:
                await client.aclose()

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        payload = self._payload(messages, stop, True, kwargs)
        response = self._send(payload, stream=True)
        request_id = response.headers.get("x-request-id")
        state, decoder = _StreamState(self.model), _SSEDecoder()
        try:
            for line in response.iter_lines():
                data = decoder.feed(line)
                if data is not None:
                    yield from state.event(data, request_id)
                if state.done:
                    break
            else:
                data = decoder.flush()
                if data is not None:
                    yield from state.event(data, request_id)
        finally:
            response.close()  # leaving early closes the connection, and the server cancels the generation
        yield state.final(request_id)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        payload = self._payload(messages, stop, True, kwargs)
        client, owned = self._async_client()
        try:
            response = await self._asend(client, payload, stream=True)
            request_id = response.headers.get("x-request-id")
            state, decoder = _StreamState(self.model), _SSEDecoder()
            try:
                async for line in response.aiter_lines():
                    data = decoder.feed(line)
                    if data is not None:
                        for item in state.event(data, request_id):
                            yield item
                    if state.done:
                        break
                else:
                    data = decoder.flush()
                    if data is not None:
                        for item in state.event(data, request_id):
                            yield item
            finally:
                await response.aclose()
            yield state.final(request_id)
        finally:
            if owned:
                await client.aclose()

    # -- structured output --------------------------------------------------------------------------------------
    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["json_schema", "json_mode"] = "json_schema",
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """A runnable answering with ``schema`` through the server's guided decoding (``response_format``).

        ``schema``: a pydantic class (-> an instance of it), a JSON-schema dict (-> a dict; OpenAI wrappers
        ``{"name", "schema"}`` are unwrapped) or a TypedDict. ``method="json_schema"`` (default) sends
        ``{"type": "json_schema", "json_schema": {"name", "schema"}}``; ``"json_mode"`` sends ``json_object``
        (any JSON object; a pydantic ``schema`` still validates the result). ``include_raw=True`` returns
        ``{"raw": AIMessage, "parsed": ... | None, "parsing_error": Exception | None}`` instead of raising.
        A ``strict`` keyword is accepted and ignored (the server's guided decoding is always strict)."""
        kwargs.pop("strict", None)
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)}")
        response_format = structured_response_format(schema, method)
        bound_kwargs: dict[str, Any] = {"response_format": response_format}
        try:
            from langchain_core.utils.function_calling import convert_to_json_schema

            convert_to_json_schema(schema)  # tracing metadata only when langchain-core understands the schema
            bound_kwargs["ls_structured_output_format"] = {"kwargs": {"method": method}, "schema": schema}
        except Exception:  # noqa: BLE001 - tracing metadata is optional
            pass
        llm = self.bind(**bound_kwargs)
        parse = _structured_parser(schema)
        if not include_raw:
            return llm | RunnableLambda(parse, name="KimiVLStructuredOutput")

        def parse_with_raw(message: BaseMessage) -> dict[str, Any]:
            try:
                return {"raw": message, "parsed": parse(message), "parsing_error": None}
            except Exception as exc:  # noqa: BLE001 - handed back to the caller
                return {"raw": message, "parsed": None, "parsing_error": exc}

        return llm | RunnableLambda(parse_with_raw, name="KimiVLStructuredOutput")
