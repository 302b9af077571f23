"""The ``chat`` task type: one model turn as a durable task, optionally continuing a session.

Input messages use the OpenAI chat format (text, ``image_url`` with data: or http(s) URLs, video parts), checked
at submission by the same validator as ``/v1/chat/completions``; remote media are fetched with the same
SSRF-safe rules. With ``options.session_id`` the turn is appended to that session (multi-turn memory).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agents.base import Agent, AgentContext, AgentError
from agents.messages import session_growth, storable
from agents.registry import register_agent
from agents.sources import check_message_media
from connectors.errors import ClientInputError
from connectors.limits import Limits
from connectors.openai_messages import ChatCompletionRequest, to_generate_request


class ChatInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Any]] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    json_schema: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _openai_messages(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ChatCompletionRequest.model_validate({"model": "kimi-vl", "messages": value})
        check_message_media(value)
        return value


class ChatOutput(BaseModel):
    text: str
    reasoning: str = ""
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    session_id: str
    parsed: Any = None


async def to_engine_messages(messages: list[dict[str, Any]], max_tokens: int | None, *,
                             limits: Limits) -> tuple[list[dict], int]:
    """OpenAI-format messages -> engine messages (media loaded under the service's ``limits`` and URL rules:
    pass ``ctx.limits``)."""
    body = {"model": "kimi-vl", "messages": messages}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    try:
        request = await to_generate_request(ChatCompletionRequest.model_validate(body), limits, "task",
                                            defaults={"max_tokens": 512})
    except ClientInputError as exc:
        raise AgentError(exc.message, code=exc.code) from None
    return list(request.messages or []), request.max_tokens


def drop_oldest_turn(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History without its oldest user turn (and the replies up to the next user turn); system messages stay."""
    system = [m for m in history if m["role"] == "system"]
    rest = [m for m in history if m["role"] != "system"]
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"]
    cut = starts[1] if len(starts) > 1 else len(rest)
    return system + rest[cut:]


async def chat_within_window(ctx: AgentContext, history: list[dict[str, Any]], new_messages: list[dict[str, Any]],
                             **params: Any) -> Any:
    """One model call with the session's history; when the conversation outgrew the context window, the oldest
    turns are left out of this call (they stay in the session) until it fits."""
    from connectors.model_client import ContextTooLongError

    dropped = 0
    while True:
        try:
            reply = await ctx.chat(history + new_messages, **params)
        except ContextTooLongError:
            shorter = drop_oldest_turn(history)
            if len(shorter) == len(history):
                raise  # the new message alone is too long
            history, dropped = shorter, dropped + 1
            continue
        if dropped:
            await ctx.emit("history_truncated", {"turns_left_out": dropped})
        return reply


async def conversation_growth(ctx: AgentContext, usage: Any) -> int:
    """Tokens this turn added to the task's session."""
    return await session_growth(ctx.sessions, ctx.session_id, ctx.owner, usage)


@register_agent
class ChatAgent(Agent):
    type = "chat"
    Input = ChatInput
    description = "One chat turn (text, images, video frames); continues options.session_id when given."

    @classmethod
    def stored_input(cls, input: ChatInput) -> dict[str, Any] | None:
        """DICOM images (data URLs) are kept de-identified: patient data never reaches the task store."""
        from connectors.dicom import deidentify_data_url

        changed = False
        messages = []
        for message in input.messages:
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for part in content:
                    ref = part.get("image_url") if isinstance(part, dict) and part.get("type") == "image_url" \
                        else None
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    clean = deidentify_data_url(url) if isinstance(url, str) else None
                    if clean is not None:
                        changed = True
                        part = {**part, "image_url": {**ref, "url": clean} if isinstance(ref, dict) else clean}
                    parts.append(part)
                message = {**message, "content": parts}
            messages.append(message)
        return {**input.model_dump(exclude_none=True), "messages": messages} if changed else None

    async def run(self, ctx: AgentContext, input: ChatInput) -> ChatOutput:
        await ctx.step("prepare")
        new_messages, max_tokens = await to_engine_messages(input.messages, input.max_tokens, limits=ctx.limits)
        # A re-run (the runner died after the model answered) must not append this turn twice: the reply and the
        # session's length before the turn are kept as a partial first, and the turn is appended only if the
        # session does not hold it yet.
        key = f"chat_turn.{ctx.task_id}"
        done = await ctx.load_partial(key)
        if done is None:
            history = await ctx.history()
            await ctx.step("generate", history_messages=len(history))
            reply = await chat_within_window(ctx, history, new_messages, max_tokens=max_tokens,
                                             temperature=input.temperature or 0.0, json_schema=input.json_schema)
            usage = reply.usage
            session = await ctx.sessions.get(ctx.session_id, ctx.owner)
            done = {"before": session.message_count if session else 0, "token_count": await conversation_growth(ctx, usage),
                    "text": reply.text, "reasoning": reply.reasoning, "finish_reason": reply.finish_reason,
                    "prompt_tokens": usage.prompt_tokens if usage else 0,
                    "completion_tokens": usage.completion_tokens if usage else 0}
            await ctx.save_partial(key, done)
        turn = storable(new_messages) + [{"role": "assistant", "content": done["text"]}]
        record = await ctx.sessions.get(ctx.session_id, ctx.owner)
        if record is None or record.message_count < done["before"] + len(turn):
            await ctx.remember(turn, token_count=done["token_count"])
        parsed = None
        if input.json_schema is not None:
            import json

            try:
                parsed = json.loads(done["text"])
            except ValueError:
                parsed = None  # cut off by max_tokens: text is returned as is
        return ChatOutput(text=done["text"], reasoning=done["reasoning"] or "", finish_reason=done["finish_reason"],
                          prompt_tokens=done["prompt_tokens"], completion_tokens=done["completion_tokens"],
                          session_id=ctx.session_id, parsed=parsed)
