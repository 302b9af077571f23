"""How the ingress reaches a model: in-process (tests, benchmarks) or through a Ray Serve handle (the service).

Both stream ``Delta`` objects and both cancel the generation when the consumer stops iterating, which is how a
disconnected HTTP client frees its cache blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from connectors.delta_wire import unpack, unpack_batch
from engine.runtime.request import Delta, GenerateRequest


class Backend(Protocol):
    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]: ...

    async def complete(self, request: GenerateRequest) -> list[Delta]: ...

    async def stats(self) -> dict[str, Any]: ...

    async def ready(self) -> bool: ...


class LocalBackend:
    """The engine in this process."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        stream = self.engine.generate(request)
        try:
            async for delta in stream:
                yield delta
        finally:
            await stream.aclose()

    async def complete(self, request: GenerateRequest) -> list[Delta]:
        return [delta async for delta in self.generate(request)]

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def ready(self) -> bool:
        return bool(self.engine.alive)


def unwrap_remote_error(exc: BaseException) -> BaseException:
    """Ray wraps a replica's exception; return the original (its type drives the HTTP status).

    Over Serve's gRPC transport (the fast path) a replica that dies mid-stream can surface as a bare
    ``grpc.aio.AioRpcError`` (Serve maps only some codes to ``ActorUnavailableError``); the replica's own errors
    travel serialized inside the response, so any RPC-level failure means the replica or the link was lost: the
    caller sees it as unavailable (503, retry), as with Ray's actor transport."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    if _is_rpc_failure(exc):
        from ray.exceptions import ActorUnavailableError

        return ActorUnavailableError(f"the model replica's connection failed ({exc.code().name})", None)  # type: ignore[attr-defined]
    return exc


def _is_rpc_failure(exc: BaseException) -> bool:
    try:
        import grpc
    except ImportError:  # pragma: no cover - grpcio comes with ray[serve]
        return False
    return isinstance(exc, grpc.aio.AioRpcError)


class RayBackend:
    """A ModelServer deployment behind a Serve handle; the stream is cancelled if the caller stops reading."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.stream_handle = handle.options(stream=True)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        response = self.stream_handle.generate.remote(request)
        finished = False
        try:
            async for item in response:
                for delta in unpack_batch(item):  # the replica sends batches of plain tuples (delta_wire)
                    if delta.finish_reason is not None:
                        finished = True
                    yield delta
        except Exception as exc:
            raise unwrap_remote_error(exc) from None
        finally:
            if not finished:
                response.cancel()

    async def complete(self, request: GenerateRequest) -> list[Delta]:
        response = self.handle.complete.remote(request)
        try:
            items = await response
        except asyncio.CancelledError:  # the HTTP client went away: stop the generation in the replica too
            response.cancel()
            raise
        except Exception as exc:
            raise unwrap_remote_error(exc) from None
        return [unpack(item) for item in items]

    async def stats(self) -> dict[str, Any]:
        return await self.handle.stats.remote()

    async def ready(self) -> bool:
        try:
            return bool(await self.handle.ready.remote())
        except Exception:
            return False
