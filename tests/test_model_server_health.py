"""ModelServer's health check fails for a dead or wedged engine (Serve then replaces the replica); it records each
finished request's decode rate."""

from __future__ import annotations

import asyncio

import pytest

from connectors.delta_wire import unpack_batch
from engine.runtime.request import Delta, Usage
from serve_app.model_server import WEDGED_AFTER_S, ModelServer


class _Engine:
    def __init__(self, **stats) -> None:
        self._stats = {"alive": True, "running": 0, "waiting": 0, "seconds_since_step": 0.0} | stats

    def stats(self):
        return self._stats


def _server(engine) -> object:
    cls = ModelServer.func_or_class
    server = cls.__new__(cls)
    server.engine = engine
    return server


def test_healthy_idle_and_busy() -> None:
    asyncio.run(_server(_Engine()).check_health())
    asyncio.run(_server(_Engine(running=3, seconds_since_step=1.0)).check_health())
    asyncio.run(_server(_Engine(seconds_since_step=10 * WEDGED_AFTER_S)).check_health())  # idle is fine


def test_dead_engine_fails() -> None:
    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(_server(_Engine(alive=False)).check_health())


def test_wedged_engine_fails() -> None:
    with pytest.raises(RuntimeError, match="wedged"):
        asyncio.run(_server(_Engine(waiting=2, seconds_since_step=WEDGED_AFTER_S + 1)).check_health())


class _StreamingEngine:
    """Yields a scripted generation: 2 tokens in the first delta, then one per delta, 0.05 s apart."""

    def __init__(self, finish: str) -> None:
        self.finish = finish

    async def generate(self, request):
        yield Delta(request_id="r", text="ab", token_ids=[1, 2])
        for k in range(4):
            await asyncio.sleep(0.05)
            last = k == 3
            yield Delta(request_id="r", text="c", token_ids=[3], finish_reason=self.finish if last else None,
                        usage=Usage(prompt_tokens=5, completion_tokens=6) if last else None)


class _Rates:
    def __init__(self) -> None:
        self.observed: list[float] = []

    def generation_rate(self, tokens_per_s: float) -> None:
        self.observed.append(tokens_per_s)


def test_decode_rate_is_recorded_per_finished_request() -> None:
    server = _server(_StreamingEngine("stop"))
    server.metrics = _Rates()
    deltas = asyncio.run(server.complete({"messages": []}))  # merged for the one reply (connectors.delta_wire)
    assert [d.text for d in deltas] == ["abcccc"] and deltas[0].token_ids == [1, 2, 3, 3, 3, 3]
    assert len(server.metrics.observed) == 1
    rate = server.metrics.observed[0]  # 4 tokens after the first delta in ~0.2 s
    assert 0 < rate <= 4 / 0.2 + 1e-6

    async def stream() -> list[Delta]:  # Ray items: lists of packed deltas, one delta each when paced like this
        return [d async for item in server.generate({"messages": []}) for d in unpack_batch(item)]

    assert len(asyncio.run(stream())) == 5 and len(server.metrics.observed) == 2
    failed = _server(_StreamingEngine("error"))
    failed.metrics = _Rates()
    asyncio.run(failed.complete({"messages": []}))
    assert failed.metrics.observed == []  # a failed generation has no decode rate
