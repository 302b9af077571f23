"""Per-key limits shared by every Ingress replica: one Lua script on the stores' Redis.

Why: :class:`serve_app.auth.KeyLimiter` lives inside one replica, so N Ingress replicas would give a key N times
its limit. This limiter keeps the same semantics (a token bucket of ``burst = max(1, rpm // 6)`` refilling at
``rpm / 60`` per second, checked after a concurrency cap; refusals raise :class:`RateLimited` with Retry-After)
but the state is in Redis and every check-and-take is one atomic script using the server's clock. The ``limits``
package was considered: its moving/fixed windows would change the bucket semantics users already see, and it
has no concurrency cap, so one short script does both.

Concurrency slots are members of a sorted set scored by an expiry (``slot_ttl_s``, longer than any request may
run), so a replica that dies holding slots cannot leak them for longer than that. Keys::

    P:lim:{name}:{key_id}:bucket   hash  tokens, ts           (expires once idle and full again)
    P:lim:{name}:{key_id}:slots    zset  slot id -> expiry

When Redis cannot be reached the replica falls back to its own in-process limiter (fail open to the old,
per-replica behaviour rather than refusing all traffic: chat does not need the store).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from redis.exceptions import RedisError

from serve_app.auth import KeyLimiter, RateLimited

__all__ = ["ClusterLease", "ClusterLimiter"]

log = logging.getLogger("kimiray.limits")

# KEYS: bucket, slots. ARGV: rate (tokens/s), burst, max_concurrent (0: no cap), slot_id, slot_ttl_s
_ACQUIRE = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= cap then return {0, 'concurrency', '1'} end
end
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
if tokens < 1 then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
  return {0, 'rate', tostring((1 - tokens) / rate)}
end
tokens = tokens - 1
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
if cap > 0 then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[5]) * 1000))
end
return {1, 'ok', '0'}
"""


class ClusterLease:
    """One admitted request; release it once (``async with``, ``await lease.aclose()``, or ``release()``)."""

    def __init__(self, limiter: "ClusterLimiter", key_id: str, slot_id: str | None, fallback: Any = None) -> None:
        self._limiter, self.key_id, self._slot_id, self._fallback = limiter, key_id, slot_id, fallback
        self.released = False

    async def aclose(self) -> None:
        if self.released:
            return
        self.released = True
        if self._fallback is not None:
            self._fallback.release()
        elif self._slot_id is not None:
            await self._limiter._free(self.key_id, self._slot_id)

    def release(self) -> None:
        """Sync release (a finished stream's callback): the slot is freed in the background."""
        if not self.released:
            asyncio.get_running_loop().create_task(self.aclose())

    async def __aenter__(self) -> "ClusterLease":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class ClusterLimiter:
    """:class:`KeyLimiter`'s limits, enforced across all replicas through Redis (see the module docstring)."""

    def __init__(self, redis: Any, name: str, requests_per_minute: int, max_concurrent: int | None, *,
                 key_prefix: str = "kr", slot_ttl_s: float = 600.0) -> None:
        self.redis = redis
        self.name = name
        self.requests_per_minute = requests_per_minute
        self.max_concurrent = max_concurrent or 0
        self.rate = requests_per_minute / 60.0
        self.burst = max(1, requests_per_minute // 6)
        self.prefix = key_prefix
        self.slot_ttl_s = slot_ttl_s
        self._acquire = redis.register_script(_ACQUIRE)
        self.fallback = KeyLimiter(requests_per_minute, max_concurrent or 1_000_000)

    def _keys(self, key_id: str) -> list[str]:
        base = f"{self.prefix}:lim:{self.name}:{key_id}"
        return [f"{base}:bucket", f"{base}:slots"]

    async def admit(self, key_id: str) -> ClusterLease:
        """Admit now or raise :class:`RateLimited` (never waits for a slot)."""
        slot_id = uuid.uuid4().hex if self.max_concurrent else None
        try:
            ok, reason, retry = await self._acquire(keys=self._keys(key_id), args=[
                repr(self.rate), self.burst, self.max_concurrent, slot_id or "", repr(self.slot_ttl_s)])
        except RedisError as exc:
            log.warning("cluster limiter unavailable, using this replica's own limits: %s", exc)
            return ClusterLease(self, key_id, None, fallback=self.fallback.acquire(key_id))
        reason = reason.decode() if isinstance(reason, bytes) else reason
        if int(ok):
            return ClusterLease(self, key_id, slot_id)
        if reason == "concurrency":
            raise RateLimited(f"Too many concurrent requests for this API key (limit {self.max_concurrent}).",
                              retry_after_s=1.0, reason="concurrency")
        raise RateLimited(f"Rate limit exceeded for this API key ({self.requests_per_minute} requests per minute).",
                          retry_after_s=max(0.001, float(retry)), reason="rate")

    async def _free(self, key_id: str, slot_id: str) -> None:
        try:
            await self.redis.zrem(self._keys(key_id)[1], slot_id)
        except RedisError as exc:  # the slot expires on its own after slot_ttl_s
            log.warning("could not free a concurrency slot: %s", exc)

    def __repr__(self) -> str:
        return (f"ClusterLimiter({self.name!r}, requests_per_minute={self.requests_per_minute}, "
                f"burst={self.burst}, max_concurrent={self.max_concurrent})")
