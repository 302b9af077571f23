"""OpenAI Responses API: the request schema, stored responses and ``previous_response_id`` chains, and the
``openai_response`` task type that runs ``background=True`` responses.

Why the session store: a stored response is a session whose id is the response id (``resp_…``). Its messages
are the turn's input (engine format, media moved to blobs) and the assistant's reply; its metadata holds the
response object, the ``previous_response_id`` link and the conversation's root id. Any ingress replica can
therefore continue a chain, and chains survive restarts of replicas and of Redis. ``instructions`` are not
stored as messages: as in OpenAI's API they apply to the response that names them only.

The conversation's root id is the model-routing session id of every turn, so turns of one conversation prefer
the replica that holds its prefix cache (``serve_app.routing``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from agents.base import Agent, AgentContext, AgentError
from agents.messages import storable
from agents.registry import register_agent
from connectors.errors import ClientInputError
from connectors.limits import Limits
from connectors.openai_messages import ChatCompletionRequest, to_generate_request
from connectors.stores.base import SessionStore

RESPONSE_KIND = "openai_response"
RESPONSE_TYPE = "openai_response"


class ResponsesInputError(ClientInputError):
    """A Responses request this server refuses (unsupported field, bad item); 400 naming ``param``."""


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat = Field(default_factory=TextFormat)
    verbosity: str | None = None


# fields of the official request this server accepts and honours or, where noted, accepts and ignores
SUPPORTED_FIELDS = {
    "model", "input", "instructions", "previous_response_id", "store", "background", "stream", "max_output_tokens",
    "temperature", "top_p", "text", "reasoning", "metadata", "user", "truncation", "parallel_tool_calls",
    "tool_choice", "tools", "stream_options", "service_tier", "prompt_cache_key", "safety_identifier",
    "max_tool_calls", "include", "top_logprobs",
}


class ResponseCreate(BaseModel):
    """``client.responses.create(...)``. Fields outside :data:`SUPPORTED_FIELDS`, and supported fields used in
    ways this server cannot honour (tools, ``include``, ``truncation="auto"``), are refused by
    :func:`check_supported` with a 400 naming them."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = Field(None, max_length=200)
    store: bool = True
    background: bool = False
    stream: bool = False
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    truncation: str | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: Any = None
    tools: list[Any] | None = None
    stream_options: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    max_tool_calls: int | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None


def check_supported(req: ResponseCreate) -> None:
    unknown = sorted(set(req.model_extra or {}) - SUPPORTED_FIELDS)
    if unknown:
        raise ResponsesInputError(f"unsupported field(s) for this server: {', '.join(unknown)}",
                                  param=unknown[0], code="unsupported_parameter")
    if req.tools:
        kinds = sorted({str(t.get("type")) if isinstance(t, dict) else "?" for t in req.tools})
        raise ResponsesInputError(f"tools are not supported by this server (got {', '.join(kinds)}): no function "
                                  "calling, file search, web search or code interpreter", param="tools",
                                  code="unsupported_parameter")
    if req.tool_choice not in (None, "auto", "none"):
        raise ResponsesInputError("tool_choice is not supported (no tools)", param="tool_choice",
                                  code="unsupported_parameter")
    if req.include:
        raise ResponsesInputError(f"include is not supported: {', '.join(req.include)}", param="include",
                                  code="unsupported_parameter")
    if req.truncation not in (None, "disabled"):
        raise ResponsesInputError("only truncation='disabled' is supported", param="truncation",
                                  code="unsupported_parameter")
    if req.top_logprobs:
        raise ResponsesInputError("top_logprobs is not supported on /v1/responses", param="top_logprobs",
                                  code="unsupported_parameter")
    if req.background and not req.store:
        raise ResponsesInputError("background responses must be stored (store=true)", param="background")
    if req.service_tier not in (None, "auto", "default"):
        raise ResponsesInputError(f"service_tier {req.service_tier!r} is not supported", param="service_tier",
                                  code="unsupported_parameter")


def _part_text(part: dict[str, Any], where: str) -> str:
    text = part.get("text")
    if not isinstance(text, str):
        raise ResponsesInputError(f"{where}.text must be a string", param=f"{where}.text")
    return text


def _chat_content(role: str, content: Any, where: str) -> Any:
    """Responses content (a string or input_text / input_image / output_text parts) -> chat content."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ResponsesInputError(f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"):
            parts.append({"type": "text", "text": _part_text(part, at) if kind != "refusal"
                          else str(part.get("refusal", ""))})
        elif kind == "input_image":
            if role != "user":
                raise ResponsesInputError(f"{at}: images are only allowed in user messages", param=at)
            if part.get("file_id"):
                raise ResponsesInputError(f"{at}.file_id is not supported: send image_url (https or data: URL)",
                                          param=f"{at}.file_id", code="unsupported_parameter")
            url = part.get("image_url")
            if not isinstance(url, str) or not url:
                raise ResponsesInputError(f"{at}.image_url must be a URL", param=f"{at}.image_url")
            image: dict[str, Any] = {"url": url}
            if part.get("detail"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        elif kind in ("input_file", "input_audio"):
            raise ResponsesInputError(f"{at}: {kind} parts are not supported by this server", param=f"{at}.type",
                                      code="unsupported_parameter")
        else:
            raise ResponsesInputError(f"{at}: unknown content part type {kind!r}", param=f"{at}.type")
    if role != "user":
        return "".join(p["text"] for p in parts)
    return parts


def input_messages(req: ResponseCreate) -> list[dict[str, Any]]:
    """``input`` (+ ``instructions`` first, as a system message) -> chat-completions messages."""
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        if not req.input:
            raise ResponsesInputError("input is empty", param="input")
        messages.append({"role": "user", "content": req.input})
        return messages
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "reasoning":
            continue  # earlier reasoning fed back is not re-templated (as in chat completions)
        if kind != "message":
            raise ResponsesInputError(f"{where}: input items of type {kind!r} are not supported by this server",
                                      param=f"{where}.type", code="unsupported_parameter")
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise ResponsesInputError(f"{where}.role must be user, system, developer or assistant",
                                      param=f"{where}.role")
        chat_role = "system" if role == "developer" else role
        messages.append({"role": chat_role, "content": _chat_content(chat_role, item.get("content"), where)})
    if len(messages) == (1 if req.instructions else 0):
        raise ResponsesInputError("input has no messages", param="input")
    return messages


def chat_body(req: ResponseCreate, served_name: str) -> dict[str, Any]:
    """The chat-completions body this response runs as (validated by ``ChatCompletionRequest``)."""
    body: dict[str, Any] = {"model": req.model or served_name, "messages": input_messages(req)}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    for name in ("temperature", "top_p"):
        if getattr(req, name) is not None:
            body[name] = getattr(req, name)
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise ResponsesInputError("text.format.schema is required for json_schema", param="text.format.schema")
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict}}
    return body


async def to_engine_request(req: ResponseCreate, served_name: str, request_id: str, limits: Limits,
                            defaults: dict[str, Any] | None = None) -> tuple[Any, int]:
    """The engine request for this turn's own messages (media loaded) and how many of its leading messages are
    the ``instructions`` (they go before the chain's history)."""
    body = chat_body(req, served_name)
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except Exception as exc:
        errors = getattr(exc, "errors", lambda: [])()
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors) or str(exc)
        raise ResponsesInputError(msg, param="input") from None
    request = await to_generate_request(chat, limits, request_id, defaults=defaults)
    return request, (1 if req.instructions else 0)


# ------------------------------------------------------------------------------------------ stored responses


class Chain(BaseModel):
    """What ``previous_response_id`` contributes: the conversation so far and its routing root."""

    history: list[dict[str, Any]] = Field(default_factory=list)
    root: str | None = None


async def stored_response(sessions: SessionStore, owner: str | None, response_id: str) -> Any:
    """The response's session, or ``None`` (missing, expired, another key's, or not a response)."""
    if not response_id.startswith("resp_"):
        return None
    session = await sessions.get(response_id, owner)
    if session is None or session.metadata.get("kind") != RESPONSE_KIND:
        return None
    return session


async def load_chain(sessions: SessionStore, owner: str, previous_response_id: str | None,
                     max_depth: int = 10_000) -> Chain:
    """Walk ``previous_response_id`` links back to the start; history in conversation order (media as bytes).
    A deleted or expired ancestor ends the walk (the conversation starts after it)."""
    if not previous_response_id:
        return Chain()
    sessions_in_chain = []
    current: str | None = previous_response_id
    while current and len(sessions_in_chain) < max_depth:
        session = await stored_response(sessions, owner, current)
        if session is None:
            if current == previous_response_id:
                raise ResponsesInputError(f"previous response {previous_response_id!r} not found (it was not "
                                          "stored, was deleted, or belongs to another key)",
                                          status_code=404, code="not_found", param="previous_response_id")
            break
        if current == previous_response_id:
            status = (session.metadata.get("response") or {}).get("status")
            if status in ("queued", "in_progress"):
                raise ResponsesInputError(f"previous response {previous_response_id!r} is still {status}",
                                          status_code=409, code="conflict", param="previous_response_id")
        sessions_in_chain.append(session)
        current = session.metadata.get("previous_response_id")
    history: list[dict[str, Any]] = []
    for session in reversed(sessions_in_chain):
        stored = await sessions.messages(session.id, owner, resolve_media=True)
        history.extend({"role": m.role, "content": m.content} for m in stored)
    root = sessions_in_chain[0].metadata.get("conversation") or sessions_in_chain[-1].id
    return Chain(history=history, root=root)


def new_response_id() -> str:
    return f"resp_{uuid.uuid4().hex}"


def usage_object(usage: Any, reasoning_tokens: int = 0) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"input_tokens": usage.prompt_tokens, "input_tokens_details": {"cached_tokens": usage.cached_tokens},
            "output_tokens": usage.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id, "type": "reasoning", "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}] if text else []}


def message_item(item_id: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def output_items(text: str, reasoning: str) -> list[dict[str, Any]]:
    items = []
    if reasoning:
        items.append(reasoning_item(f"rs_{uuid.uuid4().hex}", reasoning))
    items.append(message_item(f"msg_{uuid.uuid4().hex}", text))
    return items


def response_object(req: ResponseCreate, *, response_id: str, model: str, status: str,
                    created_at: float | None = None, output: list[dict[str, Any]] | None = None,
                    usage: Any = None, error: dict[str, Any] | None = None, finish_reason: str | None = None,
                    reasoning_tokens: int = 0) -> dict[str, Any]:
    """The ``response`` object (``object: "response"``) in OpenAI's shape."""
    fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text else {"type": "text"}
    incomplete = {"reason": "max_output_tokens"} if finish_reason == "length" else None
    if status == "completed" and incomplete is not None:
        status = "incomplete"
    return {
        "id": response_id, "object": "response", "created_at": int(created_at or time.time()), "status": status,
        "background": req.background, "error": error, "incomplete_details": incomplete,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "max_tool_calls": None,
        "model": model, "output": output or [], "parallel_tool_calls": bool(req.parallel_tool_calls),
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
        "service_tier": "default", "store": req.store, "temperature": req.temperature, "text": {"format": fmt},
        "tool_choice": req.tool_choice or "auto", "tools": [], "top_logprobs": 0, "top_p": req.top_p,
        "truncation": "disabled", "usage": usage_object(usage, reasoning_tokens), "user": req.user,
        "metadata": req.metadata or {},
    }


async def open_response(sessions: SessionStore, owner: str, req: ResponseCreate, response_id: str,
                        chain: Chain, obj: dict[str, Any], ttl_s: float | None, task_id: str | None = None) -> None:
    """Create the response's session (before a background run, or when a foreground one finished)."""
    await sessions.create(owner, session_id=response_id, ttl_s=ttl_s, metadata={
        "kind": RESPONSE_KIND, "response": obj, "previous_response_id": req.previous_response_id,
        "conversation": chain.root or response_id, "request": req.model_dump(mode="json", by_alias=True,
                                                                             exclude_none=True),
        "task_id": task_id})


async def record_turn(sessions: SessionStore, owner: str | None, response_id: str, new_messages: list[dict],
                      reply_text: str, obj: dict[str, Any], token_count: int = 0) -> None:
    """Append the turn (input messages + reply) and the final response object; one writer per response."""
    if not (await sessions.messages(response_id, owner, end=1)):  # a re-run after a crash appends nothing twice
        await sessions.append(response_id, owner, storable(new_messages) +
                              [{"role": "assistant", "content": reply_text}], token_count=token_count)
    await sessions.update_metadata(response_id, owner, {"response": obj})


def _openai_part(part: Any) -> dict[str, Any]:
    from connectors.stores.media import sniff_content_type, to_data_url

    if isinstance(part, dict) and part.get("type") == "text":
        return {"type": "input_text", "text": part.get("text", "")}
    if isinstance(part, dict) and part.get("type") == "image":
        data = part.get("image")  # bytes (read back from a blob) or a data: URL (small images stay inline)
        url = to_data_url(data, sniff_content_type(data, "image/png")) if isinstance(data, bytes) else str(data)
        return {"type": "input_image", "image_url": url, "detail": part.get("detail", "auto")}
    if isinstance(part, dict) and part.get("type") == "image_url":
        url = part["image_url"]["url"] if isinstance(part.get("image_url"), dict) else part.get("image_url")
        return {"type": "input_image", "image_url": url, "detail": "auto"}
    return {"type": "input_text", "text": str(part.get("text", "")) if isinstance(part, dict) else str(part)}


async def input_items(sessions: SessionStore, owner: str, response_id: str) -> list[dict[str, Any]]:
    """The response's input items (this turn's messages, not the reply), in OpenAI's shape."""
    stored = await sessions.messages(response_id, owner, resolve_media=True)
    items = []
    for m in stored:
        if m.role == "assistant" and m.index == len(stored) - 1:
            continue
        content = m.content if isinstance(m.content, list) else [{"type": "text", "text": m.content or ""}]
        parts = [_openai_part(p) for p in content]
        if m.role == "assistant":
            parts = [{"type": "output_text", "text": p.get("text", ""), "annotations": []} for p in parts]
        items.append({"id": f"msg_{response_id.removeprefix('resp_')}_{m.index}", "type": "message",
                      "role": m.role, "status": "completed", "content": parts})
    return items


# ------------------------------------------------------------------------------------------- background runs


class BackgroundInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str
    served_name: str = "kimi-vl"


@register_agent
class OpenAIResponseAgent(Agent):
    type = RESPONSE_TYPE
    Input = BackgroundInput
    description = "A background response of POST /v1/responses (background=true); poll or stream it there."

    async def run(self, ctx: AgentContext, input: BackgroundInput) -> dict[str, Any]:
        session = await stored_response(ctx.sessions, ctx.owner, input.response_id)
        if session is None:
            raise AgentError(f"response {input.response_id!r} is gone", code="not_found")
        req = ResponseCreate.model_validate(session.metadata.get("request") or {})
        await ctx.step("prepare")
        try:
            chain = await load_chain(ctx.sessions, ctx.owner, req.previous_response_id)
            request, n_instructions = await to_engine_request(req, input.served_name, input.response_id,
                                                              ctx.limits)
        except ClientInputError as exc:
            raise AgentError(exc.message, code=exc.code) from None
        messages = list(request.messages or [])
        own = messages[n_instructions:]
        request = request.model_copy(update={
            "messages": messages[:n_instructions] + chain.history + own,
            "session_id": session.metadata.get("conversation") or input.response_id})
        await ctx.step("generate", history_messages=len(chain.history))
        reply = await ctx.model.generate(request)
        obj = response_object(req, response_id=input.response_id, model=req.model or input.served_name,
                              status="completed", created_at=(session.metadata.get("response") or {}).get(
                                  "created_at"), output=output_items(reply.text, reply.reasoning),
                              usage=reply.usage, finish_reason=reply.finish_reason)
        await record_turn(ctx.sessions, ctx.owner, input.response_id, own, reply.text, obj)
        return obj
