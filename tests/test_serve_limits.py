"""Backpressure, timeouts and per-key limits through the real Serve application (local Ray, tiny checkpoint)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.serve_harness import running_service

KEYS = ["sk-rate", "sk-busy", "sk-slow"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    args = {
        "request_timeout_s": 3,
        "model": {"engine": {"cache_tokens": 16384}},
        "auth": {"requests_per_minute": 60, "max_concurrent_per_key": 64},
    }
    # one request at a time in the model replica and one queued: the rest is backpressure
    options = {"ModelServer": {"max_ongoing_requests": 1, "max_queued_requests": 1}}
    with running_service(tmp_path_factory.mktemp("home"), ",".join(KEYS), args, options) as url:
        yield url


def _post(url: str, key: str, body: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {key}"})


def _body(max_tokens: int, **extra) -> dict:
    return {"model": "kimi-vl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
            "ignore_eos": True} | extra


def test_per_key_rate_limit_429(service) -> None:
    statuses = [httpx.get(f"{service}/v1/models", headers={"Authorization": "Bearer sk-rate"}).status_code
                for _ in range(3)]
    assert statuses == [200, 200, 200]  # /v1/models is not rate limited
    responses = [_post(service, "sk-rate", _body(1)) for _ in range(14)]
    limited = [r for r in responses if r.status_code == 429]
    assert limited, [r.status_code for r in responses]
    assert int(limited[0].headers["Retry-After"]) >= 1
    assert limited[0].json()["error"]["code"] == "rate_limited"
    assert all(r.status_code in (200, 429) for r in responses)


def test_backpressure_503_with_retry_after(service) -> None:
    async def main():
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": "Bearer sk-busy"}) as client:
            return await asyncio.gather(*(
                client.post(f"{service}/v1/chat/completions", json=_body(150)) for _ in range(8)
            ))

    responses = asyncio.run(main())
    codes = [r.status_code for r in responses]
    assert 503 in codes, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers.get("Retry-After") and rejected.json()["error"]["code"] == "overloaded"
    assert all(c in (200, 503, 504) for c in codes), codes


def test_request_timeout_504_and_stream_error_event(service) -> None:
    slow = _post(service, "sk-slow", _body(3000))
    assert slow.status_code == 504, slow.text
    assert slow.json()["error"]["code"] == "timeout"
    steps_before = httpx.get(f"{service}/v1/stats", headers={"Authorization": "Bearer sk-slow"}).json()["steps"]
    with httpx.stream("POST", f"{service}/v1/chat/completions", json=_body(3000, stream=True), timeout=60,
                      headers={"Authorization": "Bearer sk-slow"}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    # the deadline passed mid-stream: the stream ends with the error event, no [DONE] pretending success
    assert '"code": "timeout"' in lines[-1] and "data: [DONE]" not in lines
    assert not any('"finish_reason": "' in line for line in lines)
    stats = {}
    for _ in range(100):  # and the generation was aborted: the engine is idle with its cache free
        stats = httpx.get(f"{service}/v1/stats", headers={"Authorization": "Bearer sk-slow"}).json()
        if stats["running"] == 0 and stats["cache_usage"] == 0:
            break
        time.sleep(0.1)
    assert stats["running"] == 0 and stats["cache_usage"] == 0, stats
    assert stats["steps"] - steps_before < 3000, stats  # fewer decode steps than the tokens it asked for
