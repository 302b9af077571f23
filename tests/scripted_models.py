"""Scripted stand-ins for the model, for unit tests of agent logic (no weights, no engine)."""

from __future__ import annotations

from connectors.model_client import ModelReply, ModelUnavailableError
from engine.runtime.request import GenerateRequest, Usage


class ScriptedModel:
    """Answers from a list (or a function), recording every request."""

    def __init__(self, replies: list[str] | None = None, fail_times: int = 0) -> None:
        self.replies = list(replies or [])
        self.requests: list[GenerateRequest] = []
        self.fail_times = fail_times

    async def generate(self, request: GenerateRequest) -> ModelReply:
        self.requests.append(request)
        if self.fail_times > 0:
            self.fail_times -= 1
            raise ModelUnavailableError("replica restarting")
        text = self.replies.pop(0) if self.replies else "ok"
        return ModelReply(text=text, finish_reason="stop",
                          usage=Usage(prompt_tokens=10 * len(self.requests), completion_tokens=3))
