"""Example agent: a multi-turn customer-service chat with images and session memory.

What it shows, in ~100 lines, is the whole agent SDK:

* typed input (validated at ``POST /v1/tasks``: bad input is a 422, never a failed task);
* steps that honour cancellation (``ctx.step``) and progress events (``ctx.progress``);
* session memory: each task is one customer turn; pass ``options.session_id`` (the ``session_id`` of the first
  turn's result) to continue the conversation on any replica - history, screenshots included, comes from the
  SessionStore, and model calls of the session prefer the replica that holds its prefix cache;
* JSON-schema guided output (the reply is always valid JSON of ``Reply``'s schema, even from a tiny model);
* partial results (``ctx.save_partial``) the next turn reads: here a running case summary.

Submit a turn::

    client.submit("customer_service", {"message": "My invoice shows the wrong VAT number",
                                       "images": ["data:image/png;base64,..."]})
    client.submit("customer_service", {"message": "Any update?"}, options={"session_id": first.session_id})

Run it in-process: ``kimiray.LocalRuntime().submit(...)``. Register your own agent the same way and list its
module under ``agent_modules`` in ray_config.yaml.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agents.base import Agent, AgentContext
from agents.chat import chat_within_window, conversation_growth
from agents.messages import storable
from agents.registry import register_agent

POLICY = (
    "You are the support assistant of ACME Cloud. Be brief and concrete. Refunds over 100 EUR, legal threats "
    "and account deletion go to a human (escalate=true). Never invent order numbers. Answer as JSON."
)


class CustomerTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    message: str = Field(..., min_length=1, max_length=20_000)
    images: list[str] = Field(default_factory=list, max_length=8,
                              description="screenshots as data: URLs or public http(s) URLs")
    customer_id: str | None = Field(None, max_length=200)


class Reply(BaseModel):
    reply: str = Field(..., max_length=2000)
    intent: Literal["billing", "technical", "account", "other"]
    escalate: bool


class TurnResult(BaseModel):
    session_id: str
    turn: int
    reply: Reply | None
    raw_text: str
    escalate: bool
    summary: list[str]


@register_agent
class CustomerServiceAgent(Agent):
    type = "customer_service"
    Input = CustomerTurn
    description = "Multi-turn customer-service chat with screenshots and session memory (example agent)."

    async def run(self, ctx: AgentContext, input: CustomerTurn) -> TurnResult:
        from agents.chat import to_engine_messages

        await ctx.step("load_history")
        history = await ctx.history()
        turn = sum(1 for m in history if m["role"] == "user") + 1
        await ctx.progress(1, 3, f"turn {turn}: history of {len(history)} messages")

        await ctx.step("read_message")
        parts: list[dict] = [{"type": "image_url", "image_url": {"url": url}} for url in input.images]
        parts.append({"type": "text", "text": input.message})
        new_messages, _ = await to_engine_messages([{"role": "user", "content": parts}], 256, limits=ctx.limits)
        system = [] if history else [{"role": "system", "content": POLICY}]
        await ctx.progress(2, 3, "asking the model")

        await ctx.step("answer")
        reply = await chat_within_window(ctx, history + system, new_messages, max_tokens=256,
                                         json_schema=Reply.model_json_schema(), temperature=0.0)
        parsed: Reply | None
        try:
            parsed = Reply.model_validate(json.loads(reply.text))
        except (ValueError, ValidationError):
            parsed = None  # cut off by max_tokens; the raw text is kept for the human who takes over
        await ctx.remember(storable(system + new_messages) + [{"role": "assistant", "content": reply.text}],
                           token_count=await conversation_growth(ctx, reply.usage))

        summary = list(await ctx.load_partial("summary", []))
        summary.append(f"turn {turn}: {(parsed.intent if parsed else 'unparsed')} - {input.message[:80]}")
        await ctx.save_partial("summary", summary)
        escalate = parsed.escalate if parsed else True
        if escalate:
            await ctx.emit("escalation", {"turn": turn, "customer_id": input.customer_id})
        await ctx.progress(3, 3, "answered")
        return TurnResult(session_id=ctx.session_id, turn=turn, reply=parsed, raw_text=reply.text,
                          escalate=escalate, summary=summary)
