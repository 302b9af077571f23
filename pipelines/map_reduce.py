"""Run one model call per chunk, keep each result in a child session, then combine them - resumably.

Why child sessions: a runner can die (or a task be cancelled) after hours of chunk calls. Each chunk's result
is written to its own child session (deterministic id ``<parent>.chunk-NNNN``) together with the chunk's
fingerprint before the next chunk starts, so the next attempt reuses every finished chunk whose content is
unchanged and recomputes only the rest.

Results must be JSON-serialisable: pydantic models are dumped (``model_dump(mode="json")``) and every value is
stored as its JSON round trip. ``reduce_fn`` therefore always receives plain JSON values (dicts, lists, ...),
the same whether a chunk was computed now or read back from the store; validate them into your model there.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import BaseModel

from connectors.stores.base import SessionStore
from pipelines.context import Chunk

__all__ = [
    "map_reduce",
    "MapReduceResult",
    "MapReduceCancelled",
    "chunk_session_id",
    "to_jsonable",
    "RESULT_KEY",
    "REDUCED_KEY",
]

RESULT_KEY = "result"  # child partial: {"fingerprint": ..., "value": <JSON>}
REDUCED_KEY = "reduced"  # parent partial: {"fingerprint": ..., "value": <JSON>}

MapFn = Callable[[Chunk, str], Awaitable[Any]]
ReduceFn = Callable[[list[Any]], Any]
ProgressFn = Callable[[int, int, bool], Any]
StopFn = Callable[[], Any]


class MapReduceCancelled(Exception):
    """``should_stop()`` returned true; finished chunks are stored and will be reused by the next run."""

    def __init__(self, done: int, total: int) -> None:
        super().__init__(f"stopped after {done} of {total} chunks")
        self.done = done
        self.total = total

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (Ray ships errors between workers)
        return (self.__class__, (self.done, self.total))


class MapReduceResult(BaseModel):
    """``result``: what ``reduce_fn`` returned (as returned; its JSON form is stored on the parent).
    ``chunk_results``: JSON values in chunk order. ``reused`` / ``computed``: chunks read back / run now."""

    result: Any
    chunk_results: list[Any]
    reused: int
    computed: int


def chunk_session_id(parent_session_id: str, index: int) -> str:
    return f"{parent_session_id}.chunk-{index:04d}"


def to_jsonable(value: Any, what: str = "value") -> Any:
    """Pydantic models dumped, then a JSON round trip, so a stored and a fresh value look the same."""
    try:
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        return json.loads(json.dumps(value, default=_dump_nested))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from None


def _dump_nested(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"object of type {type(obj).__name__} is not JSON-serialisable")


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _stored(partial: Any, fingerprint: str) -> tuple[bool, Any]:
    if isinstance(partial, dict) and partial.get("fingerprint") == fingerprint and "value" in partial:
        return True, partial["value"]
    return False, None


async def map_reduce(
    sessions: SessionStore,
    owner: str | None,
    parent_session_id: str,
    chunks: Sequence[Chunk],
    map_fn: MapFn,
    reduce_fn: ReduceFn,
    *,
    concurrency: int = 1,
    on_chunk_done: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> MapReduceResult:
    """Map every chunk (reusing stored results with the same fingerprint), then reduce in chunk order.

    ``map_fn(chunk, child_session_id)`` is awaited for chunks without a matching stored result; it may use the
    child session (e.g. append the conversation). ``reduce_fn(results)`` may be sync or async.
    ``on_chunk_done(index, total, reused)`` (sync or async) follows every chunk. ``should_stop()`` (sync or
    async) is asked before each chunk and before the reduce: a true answer raises :class:`MapReduceCancelled`;
    it may also raise its own exception (e.g. ``AgentContext.check_cancelled``), which propagates.
    With ``concurrency > 1`` up to that many chunks run at once; after a failure no new chunk starts, the
    running ones finish (and are stored), then the first error is raised.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    indices = [c.index for c in chunks]
    if len(set(indices)) != len(indices):
        raise ValueError("chunks must have distinct indices")

    if await sessions.get(parent_session_id, owner) is None:
        await sessions.create(owner, session_id=parent_session_id)  # type: ignore[arg-type]

    total = len(chunks)
    results: list[Any] = [None] * total
    counts = {"reused": 0, "computed": 0, "done": 0}
    order = iter(range(total))
    failures: list[BaseException] = []

    async def stop_requested() -> None:
        if should_stop is not None and await _maybe_await(should_stop()):
            raise MapReduceCancelled(counts["done"], total)

    async def run_chunk(pos: int) -> None:
        chunk = chunks[pos]
        child_id = chunk_session_id(parent_session_id, chunk.index)
        meta = {"kind": "chunk", "index": chunk.index, "fingerprint": chunk.fingerprint,
                "token_count": chunk.token_count, "total": total}
        record = await sessions.create(owner, parent_id=parent_session_id, metadata=meta,  # type: ignore[arg-type]
                                       session_id=child_id)
        reused, value = _stored((await sessions.partials(child_id, owner)).get(RESULT_KEY), chunk.fingerprint)
        if not reused:
            if any(record.metadata.get(k) != v for k, v in meta.items()):
                await sessions.update_metadata(child_id, owner, meta)
            value = to_jsonable(await map_fn(chunk, child_id), f"map_fn result for chunk {chunk.index}")
            await sessions.set_partial(child_id, owner, RESULT_KEY, {"fingerprint": chunk.fingerprint, "value": value})
        results[pos] = value
        counts["reused" if reused else "computed"] += 1
        counts["done"] += 1
        if on_chunk_done is not None:
            await _maybe_await(on_chunk_done(chunk.index, total, reused))

    async def worker() -> None:
        for pos in order:  # the shared iterator hands out chunks in order
            if failures:
                return
            try:
                await stop_requested()
                await run_chunk(pos)
            except Exception as exc:  # cancellation of the caller (CancelledError) propagates as is
                failures.append(exc)
                return

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, total))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
    if failures:
        raise failures[0]

    await stop_requested()
    result = await _maybe_await(reduce_fn(list(results)))
    combined = hashlib.sha256("\n".join(c.fingerprint for c in chunks).encode()).hexdigest()
    await sessions.set_partial(parent_session_id, owner, REDUCED_KEY,
                               {"fingerprint": combined, "value": to_jsonable(result, "reduce_fn result")})
    return MapReduceResult(result=result, chunk_results=results, reused=counts["reused"],
                           computed=counts["computed"])
