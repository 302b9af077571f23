"""Agents: the step-loop runtime (``agents.base``), the registry, the TaskRunner loop, and the built-in agents.

Users write their own agent exactly like the built-in ones::

    from pydantic import BaseModel
    from agents import Agent, AgentContext, register_agent

    class Input(BaseModel):
        question: str

    @register_agent
    class EchoAgent(Agent):
        type = "echo"
        Input = Input

        async def run(self, ctx: AgentContext, input: Input) -> dict:
            await ctx.progress(0, 1, "thinking")
            reply = await ctx.chat([{"role": "user", "content": input.question}])
            return {"answer": reply.text}
"""

from agents.base import Agent, AgentContext, AgentError, TaskCancelled
from agents.registry import AgentRegistry, default_registry, register_agent

__all__ = [
    "Agent", "AgentContext", "AgentError", "AgentRegistry", "TaskCancelled", "default_registry", "register_agent",
]
