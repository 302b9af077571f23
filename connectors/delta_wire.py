"""How engine ``Delta`` s cross the Ray handle between the ModelServer and its callers: cheaply.

A streamed token used to cost one pickled pydantic ``Delta`` per Ray item. Two things make it cheaper:

* **coalescing** (:func:`coalesce`): the replica's generator sends, per Ray item, every delta that is already
  there. When the caller keeps up that is exactly one delta, sent as soon as it exists (no added wait); when it
  lags (a busy ingress, many streams) the deltas that piled up meanwhile go as one item, merged by
  :func:`merge` into one delta whose text, token ids and logprobs are the concatenation in order;
* **plain tuples** (:func:`pack` / :func:`unpack`): a delta crosses as a tuple of builtins (pickled in
  microseconds, no pydantic validation on either side); ``unpack`` rebuilds the ``Delta`` with
  ``model_construct`` (the replica built it, so it is valid).

Merging never reorders: content followed by reasoning text stays two deltas (a chunk shows reasoning first).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from engine.runtime.request import Delta, TokenLogprob, Usage

WIRE_VERSION = 1  # first field of every packed delta: lets a caller tell the format from a pickled Delta


def merge(deltas: list[Delta]) -> list[Delta]:
    """Consecutive deltas of one request joined where that keeps the stream's content and order exact."""
    out: list[Delta] = []
    for delta in deltas:
        last = out[-1] if out else None
        if (last is None or last.finish_reason is not None or last.error is not None
                or (last.text and delta.reasoning_text)
                or _lacks_logprobs(last, delta) or _lacks_logprobs(delta, last)):
            out.append(delta)
            continue
        logprobs = None if last.logprobs is None and delta.logprobs is None else \
            [*(last.logprobs or []), *(delta.logprobs or [])]
        out[-1] = Delta.model_construct(
            request_id=last.request_id, text=last.text + delta.text,
            reasoning_text=last.reasoning_text + delta.reasoning_text, token_ids=[*last.token_ids, *delta.token_ids],
            logprobs=logprobs, finish_reason=delta.finish_reason, usage=delta.usage if delta.usage is not None
            else last.usage, error=delta.error)
    return out


def _lacks_logprobs(a: Delta, b: Delta) -> bool:
    """``a`` has tokens without logprobs while ``b`` has logprobs: merged, the logprobs would not line up."""
    return a.logprobs is None and bool(a.token_ids) and b.logprobs is not None


def _pack_logprob(lp: TokenLogprob) -> tuple:
    return (lp.token_id, lp.logprob, [tuple(t) for t in lp.top], lp.token_bytes, lp.top_bytes)


def _unpack_logprob(item: tuple) -> TokenLogprob:
    token_id, logprob, top, token_bytes, top_bytes = item
    return TokenLogprob.model_construct(token_id=token_id, logprob=logprob, top=[tuple(t) for t in top],
                                        token_bytes=token_bytes, top_bytes=top_bytes)


def pack(delta: Delta) -> tuple:
    usage = delta.usage
    return (WIRE_VERSION, delta.request_id, delta.text, delta.reasoning_text, delta.token_ids,
            None if delta.logprobs is None else [_pack_logprob(lp) for lp in delta.logprobs],
            delta.finish_reason,
            None if usage is None else (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens),
            delta.error)


def unpack(item: Any) -> Delta:
    """A packed tuple, or (an older replica) a ``Delta`` / its dict, as a ``Delta``."""
    if isinstance(item, Delta):
        return item
    if isinstance(item, dict):
        return Delta.model_validate(item)
    _version, request_id, text, reasoning, token_ids, logprobs, finish, usage, error = item
    return Delta.model_construct(
        request_id=request_id, text=text, reasoning_text=reasoning, token_ids=token_ids,
        logprobs=None if logprobs is None else [_unpack_logprob(lp) for lp in logprobs], finish_reason=finish,
        usage=None if usage is None else Usage.model_construct(prompt_tokens=usage[0], completion_tokens=usage[1],
                                                               cached_tokens=usage[2]),
        error=error)


def pack_batch(deltas: list[Delta]) -> list[tuple]:
    return [pack(d) for d in merge(deltas)]


def unpack_batch(item: Any) -> list[Delta]:
    """One Ray item: a list of packed deltas, or (an older replica) one ``Delta``."""
    if isinstance(item, list):
        return [unpack(x) for x in item]
    return [unpack(item)]


async def coalesce(source: AsyncIterator[Delta]) -> AsyncIterator[list[Delta]]:
    """``source``'s deltas in lists: each list as soon as one delta is there, holding all that arrived while the
    consumer was busy with the previous list. Closing this generator (the caller went away) cancels the reader,
    which closes ``source`` (the engine aborts the request)."""
    buffer: deque[Delta] = deque()
    ready = asyncio.Event()
    failure: list[BaseException] = []
    ended = False

    async def read() -> None:
        nonlocal ended
        try:
            async for delta in source:
                buffer.append(delta)
                ready.set()
        except Exception as exc:  # noqa: BLE001 - re-raised to the consumer, after the deltas before it
            failure.append(exc)
        finally:
            ended = True
            ready.set()

    reader = asyncio.ensure_future(read())
    try:
        while True:
            if buffer:
                batch = list(buffer)
                buffer.clear()
                yield batch
            elif ended:
                if failure:
                    raise failure[0]
                return
            else:
                await ready.wait()
                ready.clear()
    finally:
        if not reader.done():
            reader.cancel()  # the reader's CancelledError closes ``source`` (its finally aborts the request)
            try:
                await asyncio.wait({reader}, timeout=5.0)  # so the abort has happened when this returns
            except BaseException:  # noqa: BLE001 - cancelled again meanwhile: the reader still finishes alone
                pass
