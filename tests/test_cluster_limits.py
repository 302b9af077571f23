"""Cluster-wide per-key limits: several limiters (one per Ingress replica) on one real redis-server hold one
limit, and three Ingress replicas in a real local Ray + Serve give a key its configured creation budget, not three
times it, with Retry-After on every 429."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from connectors.stores.redis_store import connect
from serve_app.auth import RateLimited
from serve_app.cluster_limits import ClusterLimiter
from tests.redis_harness import redis_server

pytestmark = pytest.mark.integration


def test_three_limiters_share_one_bucket_and_one_concurrency_cap(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as redis:
            clients = [connect(redis.url) for _ in range(3)]  # three replicas: three connections, one Redis
            limiters = [ClusterLimiter(c, "req", requests_per_minute=60, max_concurrent=3) for c in clients]
            admitted, refused = [], []
            for i in range(30):
                try:
                    lease = await limiters[i % 3].admit("key-a")
                except RateLimited as exc:
                    refused.append(exc)
                else:
                    admitted.append(lease)
                    await lease.aclose()
            assert len(admitted) == limiters[0].burst == 10  # 60/min: a burst of 10, shared by all three
            assert all(e.reason == "rate" and 0 < e.retry_after_s <= 1.1 for e in refused)
            assert int(refused[0].headers["Retry-After"]) >= 1
            other = await limiters[0].admit("key-b")  # another key has its own budget
            await other.aclose()

            wide = [ClusterLimiter(c, "conc", requests_per_minute=6000, max_concurrent=3) for c in clients]
            held = [await wide[i].admit("key-c") for i in range(3)]
            with pytest.raises(RateLimited) as exc:
                await wide[0].admit("key-c")
            assert exc.value.reason == "concurrency"
            await held[1].aclose()  # a slot freed on one replica is usable from another
            held[1] = await wide[2].admit("key-c")
            for lease in held:
                await lease.aclose()
            for c in clients:
                await c.aclose()

    asyncio.run(main())


def test_limiter_falls_back_to_the_replica_limits_when_redis_is_away(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as redis:
            url = redis.url
        client = connect(url, retries=0)  # the server is gone
        limiter = ClusterLimiter(client, "req", requests_per_minute=6, max_concurrent=2)
        lease = await limiter.admit("key-a")  # admitted by the in-process fallback (burst 1)
        with pytest.raises(RateLimited):
            await limiter.admit("key-a")
        await lease.aclose()
        await client.aclose()

    asyncio.run(main())


def test_three_ingress_replicas_hold_one_creation_budget(tmp_path: Path) -> None:
    """30 sequential session creations through Serve's proxy: the router spreads them over the three replicas
    (power-of-two choices among idle replicas; all 30 on one replica has probability ~3^-29), and only the burst of
    the cluster-wide budget (60/min -> 10, plus 1/s refill) is admitted; per-replica limits would admit 30."""
    from tests.serve_harness import running_service

    with redis_server(tmp_path / "redis") as redis:
        args = {"tasks": {"stores_url": redis.url},
                "auth": {"creates_per_minute": 60, "requests_per_minute": 6000}}
        with running_service(tmp_path / "home", "sk-cluster-limits", args,
                             deployment_options={"Ingress": {"num_replicas": 3}}) as base:
            headers = {"Authorization": "Bearer sk-cluster-limits"}
            codes, retry_after = [], []
            started = time.monotonic()
            with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
                for _ in range(30):
                    r = client.post("/v1/sessions", json={})
                    codes.append(r.status_code)
                    if r.status_code == 429:
                        retry_after.append(r.headers.get("Retry-After"))
                        assert r.json()["error"]["code"] == "rate_limited"
            elapsed = time.monotonic() - started
            # the burst of 10, plus what refilled meanwhile (1 per second); per-replica limits would allow 30
            assert 10 <= codes.count(201) <= 10 + int(elapsed) + 1, (elapsed, codes)
            assert codes.count(201) + codes.count(429) == 30, codes
            assert all(v is not None and int(v) >= 1 for v in retry_after)
