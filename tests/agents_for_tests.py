"""Agents used by the task-layer tests (registered through ``agent_modules``, like a user's own module)."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from agents import Agent, AgentContext, AgentError, register_agent


class SleepyInput(BaseModel):
    steps: int = Field(3, ge=1, le=100_000)
    step_s: float = Field(0.05, ge=0, le=60)
    tag: str = ""
    fail_with: str | None = None


@register_agent
class SleepyAgent(Agent):
    """Steps that take time, with progress; optional failure. Uses no model."""

    type = "sleepy"
    Input = SleepyInput

    async def run(self, ctx: AgentContext, input: SleepyInput) -> dict:
        for i in range(input.steps):
            await ctx.step("sleep", index=i)
            await asyncio.sleep(input.step_s)
            await ctx.progress(i + 1, input.steps, f"step {i + 1}")
        if input.fail_with:
            raise AgentError(input.fail_with, code="requested_failure")
        return {"tag": input.tag, "steps": input.steps, "attempt": ctx.attempt}


class ChunkedInput(BaseModel):
    words: int = Field(2000, ge=1)
    chunk_tokens: int = Field(300, ge=50)
    map_delay_s: float = Field(0.0, ge=0)


@register_agent
class ChunkedCountAgent(Agent):
    """A long text planned into chunks with the real tokenizer; map = count words, reduce = sum. Each computed
    chunk emits ``chunk_computed`` so tests can see which chunks a resumed run redid."""

    type = "chunked_count"
    Input = ChunkedInput

    async def run(self, ctx: AgentContext, input: ChunkedInput) -> dict:
        from connectors.paths import tiny_checkpoint_dir
        from pipelines import ContextBudget, ContextPlanner, Piece, TokenCounter, map_reduce

        counter = TokenCounter.from_pretrained(tiny_checkpoint_dir())
        planner = ContextPlanner(counter, ContextBudget(context_window=input.chunk_tokens + 200, output_reserve=100))
        paragraphs = [" ".join(f"w{p}x{i}" for i in range(40)) for p in range((input.words + 39) // 40)]
        pieces = [Piece(id=f"p{i}", kind="text", text=t, boundary=1) for i, t in enumerate(paragraphs)]
        chunks = planner.plan(pieces, prefix_messages=[{"role": "system", "content": "Count the words."}])

        async def map_fn(chunk, child_session_id: str) -> dict:
            await asyncio.sleep(input.map_delay_s)
            text = " ".join(p.get("text", "") for p in chunk.content())
            await ctx.emit("chunk_computed", {"index": chunk.index})
            return {"words": len(text.split())}

        async def on_done(index: int, total: int, reused: bool) -> None:
            await ctx.progress(index + 1, total, f"chunk {index + 1}/{total}{' (reused)' if reused else ''}")

        result = await map_reduce(ctx.sessions, ctx.owner, ctx.session_id, chunks, map_fn,
                                  lambda results: {"chunks": len(results)}, on_chunk_done=on_done,
                                  should_stop=lambda: ctx.cancel_requested)
        return {**result.result, "reused": result.reused, "computed": result.computed}


class ReportInput(BaseModel):
    text: str = Field("report", max_length=10_000)


@register_agent
class ReportAgent(Agent):
    """Writes one artifact (a blob owned by the task's key), as the contract and video agents do. Uses no model."""

    type = "report"
    Input = ReportInput

    async def run(self, ctx: AgentContext, input: ReportInput) -> dict:
        ref = await ctx.blobs.put(ctx.owner, input.text.encode(), "text/plain")
        return {"artifacts": {"report": {**ref.model_dump(), "filename": "report.txt"}}}
