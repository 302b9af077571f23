"""How agents reach the model: one small interface over the in-process engine or a Ray Serve handle.

Agents never see the transport. Inside the cluster the client wraps the ModelServer DeploymentHandle (through
``connectors.backend.RayBackend``), in ``LocalRuntime`` the in-process engine (``LocalBackend``); unit tests of
agent logic pass a scripted client with the same ``generate`` method.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, Field

from engine.runtime.request import Delta, GenerateRequest, Usage

log = logging.getLogger("kimiray.model_client")


class ModelError(RuntimeError):
    """The model failed this request (engine error, bad input); retrying the same request won't help."""


class ContextTooLongError(ModelError):
    """Prompt + max_tokens exceed the model's window: shorten the history or plan chunks (pipelines.context)."""


class ModelUnavailableError(RuntimeError):
    """No model replica could take the request right now (overloaded, restarting): retry later."""


class ModelReply(BaseModel):
    text: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    token_ids: list[int] = Field(default_factory=list)


@runtime_checkable
class ModelClient(Protocol):
    async def generate(self, request: GenerateRequest) -> ModelReply: ...


def reply_from_deltas(deltas: list[Delta]) -> ModelReply:
    if not deltas:
        raise ModelError("the model returned no output")
    final = deltas[-1]
    if final.finish_reason == "error":
        raise ModelError(final.error or "generation failed")
    return ModelReply(
        text="".join(d.text for d in deltas),
        reasoning="".join(d.reasoning_text for d in deltas),
        finish_reason=final.finish_reason,
        usage=final.usage,
        token_ids=[t for d in deltas for t in d.token_ids],
    )


class BackendModelClient:
    """A ``connectors.backend`` Backend (LocalBackend or RayBackend) as a ModelClient.

    A generation has no side effects, so when the model side is unavailable (a replica died mid-request, is
    restarting, or sheds load) the same request is sent again, with backoff, for up to ``retry_s``: the task
    keeps its lease and spends no attempt on a fault that is not its own. Only then ``ModelUnavailableError``
    reaches the runner, which re-queues the task (counted)."""

    def __init__(self, backend: Any, *, retry_s: float = 60.0, backoff_s: tuple[float, float] = (0.25, 2.0)) -> None:
        self.backend = backend
        self.retry_s = retry_s
        self.backoff_s = backoff_s

    async def generate(self, request: GenerateRequest) -> ModelReply:
        deadline = time.monotonic() + self.retry_s
        delay = self.backoff_s[0]
        while True:
            try:
                return await self._generate_once(request)
            except ModelUnavailableError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("model unavailable (%s); sending the request again in %.2fs",
                            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_s[1])

    async def _generate_once(self, request: GenerateRequest) -> ModelReply:
        from engine.runtime.engine import EngineDeadError, EngineOverloadedError, RequestTooLongError

        try:
            deltas = await self.backend.complete(request)
        except (EngineOverloadedError, EngineDeadError) as exc:
            raise ModelUnavailableError(str(exc)) from exc
        except RequestTooLongError as exc:
            raise ContextTooLongError(str(exc)) from exc
        except Exception as exc:
            if _is_unavailable(exc):
                raise ModelUnavailableError(str(exc)) from exc
            raise
        return reply_from_deltas(deltas)


def _is_unavailable(exc: BaseException) -> bool:
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (ActorDiedError, ActorUnavailableError, BackPressureError, DeploymentUnavailableError))
