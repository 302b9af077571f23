"""ModelServer's health check fails for a dead or wedged engine (Serve then replaces the replica)."""

from __future__ import annotations

import asyncio

import pytest

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
