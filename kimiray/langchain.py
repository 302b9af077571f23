"""LangChain chat model for a kimiray server (Kimi-VL behind an OpenAI-compatible API).

Needs the ``langchain`` extra (``pip install 'kimiray[langchain]'``: ``langchain-core`` and ``langchain-openai``).
:class:`ChatKimiVL` is ``langchain-openai``'s ``BaseChatOpenAI`` pointed at kimiray, so HTTP, retries (429 / 5xx /
failed connects, ``Retry-After`` honoured), streaming, usage and structured output are the well-kept OpenAI ones;
this module adds only what kimiray does differently::

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

What differs from ``ChatOpenAI``:

* ``base_url`` / ``api_key`` default to ``$KIMIRAY_BASE_URL`` (else ``http://127.0.0.1:8000/v1``) and
  ``$KIMIRAY_API_KEY``; without a key no ``Authorization`` header is sent. Usage is always streamed (last chunk).
* Messages go through :func:`convert_message`: images (OpenAI parts, LangChain v1 / v0 blocks) and videos
  (LangChain ``{"type": "video", "url" | "base64"}`` -> ``video_url``; the server's own ``video`` / ``video_url``
  parts pass through); earlier reasoning is not sent back.
* The server's ``reasoning_content`` (Thinking models) lands in ``additional_kwargs["reasoning_content"]``, on the
  message and on each streamed chunk; ``response_metadata["model_provider"]`` is ``"kimiray"``.
* No tool calling: ``bind_tools``, ``tools`` / ``tool_choice`` arguments, tool messages and AI messages with tool
  calls raise ``ValueError``; ``with_structured_output`` uses ``json_schema`` (default) or ``json_mode``.
* A stream that ends without a finish reason (the server failed mid-answer) raises instead of looking complete.

Errors are the ``openai`` package's (re-exported as :data:`KimiVLAPIError` = ``openai.APIError`` with
``status_code``, ``code``, ``message``, ``param``, ``request_id`` on status errors, and
:data:`KimiVLConnectionError` = ``openai.APIConnectionError``); an error event inside a stream raises
``openai.APIError`` too.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Literal

import openai
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
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
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils import from_env, secret_from_env
from langchain_openai._compat import httpx  # the httpx the installed openai SDK uses (httpx2 for openai>=3)
from langchain_openai.chat_models.base import BaseChatOpenAI
from pydantic import ConfigDict, Field, SecretStr, model_validator
from typing_extensions import Self

__all__ = ["ChatKimiVL", "KimiVLAPIError", "KimiVLConnectionError", "convert_message"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
PROVIDER = "kimiray"
NO_TOOLS = "kimiray has no tool calling (use with_structured_output for JSON answers)"
_NO_KEY = "no-key"  # placeholder for the openai client; never sent
_TOOL_ARGS = ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls")

KimiVLAPIError = openai.APIError
KimiVLConnectionError = openai.APIConnectionError


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
        raise ValueError(f"{NO_TOOLS}: tool / function messages cannot be sent")
    if isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        if message.tool_calls or message.additional_kwargs.get("tool_calls"):
            raise ValueError(f"{NO_TOOLS}: AI messages with tool calls cannot be sent")
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
# The chat model
# ------------------------------------------------------------------------------------------------------------
def _reasoning_of(message: Any) -> str | None:
    """``reasoning_content`` of an OpenAI message / delta (a dict or an ``openai`` model with extra fields)."""
    if isinstance(message, Mapping):
        value = message.get("reasoning_content")
    else:
        value = getattr(message, "reasoning_content", None)
    return value or None


class _FinishWatch:
    """Raises at the end of a stream that never carried a finish reason: the server failed mid-answer (it
    sends an error event, which the openai client raises, or drops the connection)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.finished = False

    def see(self, chunk: ChatGenerationChunk) -> ChatGenerationChunk:
        if (chunk.generation_info or {}).get("finish_reason"):
            self.finished = True
        return chunk

    def check(self) -> None:
        if not self.finished:
            raise KimiVLAPIError("the stream ended before the answer finished",
                                 request=httpx.Request("POST", self.url), body=None)


class ChatKimiVL(BaseChatOpenAI):
    """Kimi-VL served by kimiray (or any OpenAI-compatible ``/chat/completions`` endpoint with the same
    extensions). See the module docstring for what differs from ``ChatOpenAI``."""

    model_config = ConfigDict(populate_by_name=True, arbitrary_types_allowed=True)

    model_name: str = Field(default="kimi-vl", alias="model")
    openai_api_base: str = Field(alias="base_url",
                                 default_factory=from_env("KIMIRAY_BASE_URL", default=DEFAULT_BASE_URL))
    """API root including ``/v1`` (env ``KIMIRAY_BASE_URL``)."""
    openai_api_key: SecretStr | None = Field(alias="api_key",
                                             default_factory=secret_from_env("KIMIRAY_API_KEY", default=None))
    """Bearer key (env ``KIMIRAY_API_KEY``); None sends no Authorization header."""
    request_timeout: float | None = Field(default=120.0, alias="timeout")
    """Seconds for connect / each read; None: no limit."""
    max_retries: int = 2
    """Retries of 429 / 5xx answers and failed connects (the openai client's policy, ``Retry-After`` honoured)."""
    stream_usage: bool = True
    """Ask for usage on the last streamed chunk (``stream_options.include_usage``)."""
    use_responses_api: bool | None = False
    """kimiray serves Chat Completions only."""

    # -- LangChain plumbing ------------------------------------------------------------------------------------
    @property
    def _api_key(self) -> str:
        return self.openai_api_key.get_secret_value() if self.openai_api_key else ""

    @property
    def _url(self) -> str:
        return self.openai_api_base.rstrip("/") + "/chat/completions"

    @property
    def _llm_type(self) -> str:
        return "kimiray-chat"

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"openai_api_key": "KIMIRAY_API_KEY"}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = PROVIDER
        return params

    @model_validator(mode="after")
    def validate_environment(self) -> Self:
        """The openai clients, aimed at kimiray (replaces ``BaseChatOpenAI``'s validator of the same name, which
        reads OpenAI's environment and insists on a key)."""
        params: dict[str, Any] = {
            # the openai client insists on a key; without one each request omits the header (_get_request_payload)
            "api_key": self._api_key or _NO_KEY,
            "base_url": self.openai_api_base, "timeout": self.request_timeout, "max_retries": self.max_retries,
            "default_headers": self.default_headers, "default_query": self.default_query,
        }
        if not self.client:
            self.root_client = openai.OpenAI(**params, http_client=self.http_client)
            self.client = self.root_client.chat.completions
        if not self.async_client:
            self.root_async_client = openai.AsyncOpenAI(**params, http_client=self.http_async_client)
            self.async_client = self.root_async_client.chat.completions
        return self

    # -- requests --------------------------------------------------------------------------------------------
    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        raise ValueError(NO_TOOLS)

    def _get_request_payload(self, input_: LanguageModelInput, *, stop: list[str] | None = None,
                             **kwargs: Any) -> dict:
        if any(kwargs.get(name) is not None for name in _TOOL_ARGS):
            raise ValueError(NO_TOOLS)
        payload = {**self._default_params, **kwargs}
        if stop is not None:
            payload["stop"] = stop
        payload["messages"] = [convert_message(m) for m in self._convert_input(input_).to_messages()]
        if not self._api_key:
            payload["extra_headers"] = {**payload.get("extra_headers", {}), "Authorization": openai.Omit()}
        return payload

    # -- answers ---------------------------------------------------------------------------------------------
    def _create_chat_result(self, response: dict | openai.BaseModel,
                            generation_info: dict | None = None) -> ChatResult:
        result = super()._create_chat_result(response, generation_info)
        choices = response.get("choices") if isinstance(response, Mapping) else getattr(response, "choices", None)
        reasoning = _reasoning_of(choices[0]["message"] if isinstance(choices[0], Mapping)
                                  else choices[0].message) if choices else None
        for generation in result.generations:
            generation.message.response_metadata["model_provider"] = PROVIDER
        if reasoning:
            result.generations[0].message.additional_kwargs["reasoning_content"] = reasoning
        return result

    def _convert_chunk_to_generation_chunk(self, chunk: dict, default_chunk_class: type,
                                           base_generation_info: dict | None) -> ChatGenerationChunk | None:
        generation = super()._convert_chunk_to_generation_chunk(chunk, default_chunk_class, base_generation_info)
        if generation is None or not isinstance(generation.message, AIMessageChunk):
            return generation
        generation.message.response_metadata["model_provider"] = PROVIDER
        choices = chunk.get("choices") or []
        reasoning = _reasoning_of(choices[0].get("delta") or {}) if choices else None
        if reasoning:
            generation.message.additional_kwargs["reasoning_content"] = reasoning
        return generation

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        watch = _FinishWatch(self._url)
        for chunk in super()._stream(messages, stop=stop, run_manager=run_manager, **kwargs):
            yield watch.see(chunk)
        watch.check()

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        watch = _FinishWatch(self._url)
        async for chunk in super()._astream(messages, stop=stop, run_manager=run_manager, **kwargs):
            yield watch.see(chunk)
        watch.check()

    # -- structured output --------------------------------------------------------------------------------------
    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: Literal["json_schema", "json_mode"] = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """A runnable answering with ``schema`` through the server's guided decoding (``response_format``):
        ``json_schema`` (default; a pydantic class gives an instance, a JSON-schema dict a dict) or ``json_mode``
        (any JSON object). ``function_calling`` is refused: the server has no tools."""
        if method not in ("json_schema", "json_mode"):
            raise ValueError(f"method must be 'json_schema' or 'json_mode' ({NO_TOOLS}), got {method!r}")
        if kwargs.get("tools"):
            raise ValueError(NO_TOOLS)
        return super().with_structured_output(schema, method=method, include_raw=include_raw, strict=strict,
                                              **kwargs)
