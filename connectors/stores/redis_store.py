"""Redis stores: tasks, sessions and blobs shared by every process of a cluster.

Why Lua: each state transition touches several keys (the task hash, a queue, the lease index, the event
stream), and runners on many machines race for the same tasks; a script runs atomically, so no transition
is seen half done and no task is leased twice. All times inside scripts come from the Redis server's ``TIME``
so runners with skewed clocks agree on when a lease expired. Scripts are registered with
``register_script`` (re-sent after ``NOSCRIPT``, e.g. after a server restart) and the client retries on
connection errors for ~17 s, so a store survives a Redis restart without being recreated.

Keys (``P`` = key prefix, default ``kr``; standalone Redis, not cluster: scripts build key names)::

    P:task:{id}              hash    the task (JSON fields: input, options, result, error, progress)
    P:task:{id}:events       stream  entry id "{n}-1" for event n (1, 2, 3 ...), fields type, data, ts
    P:queued / P:queued:{t}  zset    queued task ids (all / of type t), score created_at
    P:leases                 zset    running task ids, score lease expiry
    P:ended                  zset    ended task ids, score expires_at (for purge_expired)
    P:owner:{owner}:tasks    zset    an owner's task ids, score created_at (list)
    P:idem:{sha1(owner\\0key)} string task id for an idempotency key
    P:sess:{id}              hash    session record; metadata as fields "m:{key}" (JSON values)
    P:sess:{id}:msgs         list    messages (JSON; the index is the position)
    P:sess:{id}:partials     hash    partial results (JSON values)
    P:sess:{id}:children     list    child session ids in creation order
    P:blob:{owner}:{sha}     string  blob bytes;  P:blobmeta:{owner}:{sha} hash (size, content_type)

A session with a TTL has all four of its keys on the same ``PEXPIRE``, renewed by every write.

Caveat: a write retried after the connection dropped mid-call may run twice (e.g. ``append_event``); task
transitions are guarded by state and tokens so a repeat is a no-op.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Literal

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from pydantic import BaseModel, Field
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from connectors.stores import media
from connectors.stores.sentinel import connect_sentinel, is_sentinel_url, parse_sentinel_url
from connectors.stores.base import (
    TERMINAL_STATUSES,
    BlobRef,
    BlobStore,
    InvalidCursor,
    Lease,
    LeaseState,
    NotFound,
    Progress,
    SessionMessage,
    SessionRecord,
    StoreError,
    TaskError,
    TaskEvent,
    TaskPage,
    TaskRecord,
    TaskSubmission,
    new_id,
)

__all__ = ["connect", "NotReplicated", "ReplicaAcks", "RedisTaskStore", "RedisSessionStore", "RedisBlobStore",
           "write_and_wait"]


def connect(url: str, *, decode_responses: bool = True, retries: int = 20) -> Redis:
    """A client that rides out a Redis restart or a Sentinel failover: connection errors (also ``LOADING`` while
    the AOF replays, and ``READONLY`` from a demoted primary) are retried with exponential backoff (100 ms doubling,
    capped at 1 s, 20 tries: ~17 s in all). A ``redis+sentinel://`` URL gets a client that asks the sentinels for
    the primary on every reconnect (:mod:`connectors.stores.sentinel`)."""
    kwargs: dict[str, Any] = dict(
        decode_responses=decode_responses,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=retries),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=10,
        socket_connect_timeout=5,
        socket_keepalive=True,
    )
    if is_sentinel_url(url):
        return connect_sentinel(parse_sentinel_url(url), **kwargs)
    return Redis.from_url(url, **kwargs)


class NotReplicated(StoreError):
    """A write was applied on the primary but fewer replicas than required confirmed it within the timeout
    (``WAIT``): it must not be reported as accepted. The HTTP layer answers 503 with Retry-After."""


class ReplicaAcks(BaseModel):
    """How many replicas must confirm a write (``WAIT numreplicas timeout``) before it counts as accepted."""

    count: int = Field(0, ge=0, le=16)
    timeout_s: float = Field(2.0, gt=0)


async def write_and_wait(redis: Redis, acks: ReplicaAcks, script: Any, args: list[Any]) -> Any:
    """Run ``script`` and, when acks are required, ``WAIT`` on the same connection (one pipeline: ``WAIT`` covers
    only its own connection's writes and cannot run inside a script). A new primary after a failover may not know
    the script (SCRIPT LOAD is not replicated): ``NOSCRIPT`` loads it there and runs the pipeline again."""
    if acks.count == 0:
        return await script(keys=[], args=args)
    for attempt in range(3):
        pipe = redis.pipeline(transaction=False)
        await script(keys=[], args=args, client=pipe)
        pipe.execute_command("WAIT", acks.count, max(1, round(acks.timeout_s * 1000)))
        try:
            result, acked = await pipe.execute()
        except NoScriptError:
            if attempt == 2:
                raise
            await redis.script_load(script.script)
            continue
        if int(acked) < acks.count:
            raise NotReplicated(f"write confirmed by {acked} of the {acks.count} required replica(s) within "
                                f"{acks.timeout_s:g} s")
        return result
    raise AssertionError("unreachable")


def _client(target: str | Redis, decode_responses: bool) -> tuple[Redis, bool]:
    """(client, owned): a URL gets a new client that this store closes; a given client is only borrowed."""
    if isinstance(target, Redis):
        return target, False
    return connect(target, decode_responses=decode_responses), True


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _pairs(flat: list[Any]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2]))


# ------------------------------------------------------------------------------------------------------ Lua

_PRELUDE = r"""
local P = ARGV[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.6f', x) end
local function tkey(id) return P .. ':task:' .. id end
local function add_event(id, typ, data, ts)
  local n = redis.call('HINCRBY', tkey(id), 'last_event_id', 1)
  redis.call('XADD', tkey(id) .. ':events', n .. '-1', 'type', typ, 'data', data, 'ts', ts)
  return n
end
local function unqueue(id, typ)
  redis.call('ZREM', P .. ':queued', id)
  redis.call('ZREM', P .. ':queued:' .. typ, id)
end
local function end_task(id, status, t, event_data)
  local k = tkey(id)
  local exp = t + tonumber(redis.call('HGET', k, 'retention_s'))
  redis.call('HSET', k, 'status', status, 'finished_at', fmt(t), 'updated_at', fmt(t), 'expires_at', fmt(exp))
  redis.call('HDEL', k, 'lease_worker', 'lease_token', 'lease_expires_at')
  redis.call('ZREM', P .. ':leases', id)
  unqueue(id, redis.call('HGET', k, 'type'))
  redis.call('ZADD', P .. ':ended', fmt(exp), id)
  add_event(id, 'status', event_data, fmt(t))
end
local function current(k, token)
  local f = redis.call('HMGET', k, 'status', 'lease_token')
  return f[1] == 'running' and f[2] == token
end
"""

# ARGV: P, id, owner, type, input, options, idempotency_key|'', max_attempts, retention_s, idem_redis_key|''
_SUBMIT = _PRELUDE + r"""
local id, owner, typ, idem = ARGV[2], ARGV[3], ARGV[4], ARGV[10]
if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing and redis.call('EXISTS', tkey(existing)) == 1 then
    -- a write, so that a WAIT after this call also covers the first submission (a retry after a 503 must not
    -- report as accepted a task the replicas never confirmed): replication is one ordered stream
    redis.call('HINCRBY', tkey(existing), 'idem_hits', 1)
    return {0, redis.call('HGETALL', tkey(existing))}
  end
end
local ts = fmt(now())
local k = tkey(id)
redis.call('HSET', k, 'id', id, 'owner', owner, 'type', typ, 'status', 'queued', 'input', ARGV[5],
  'options', ARGV[6], 'created_at', ts, 'updated_at', ts, 'attempts', 0, 'max_attempts', ARGV[8],
  'retention_s', ARGV[9], 'cancel_requested', 0, 'last_event_id', 0)
if idem ~= '' then
  redis.call('HSET', k, 'idempotency_key', ARGV[7], '_idem', idem)
  redis.call('SET', idem, id)
end
redis.call('ZADD', P .. ':queued', ts, id)
redis.call('ZADD', P .. ':queued:' .. typ, ts, id)
redis.call('ZADD', P .. ':owner:' .. owner .. ':tasks', ts, id)
add_event(id, 'status', '{"status":"queued"}', ts)
return {1, redis.call('HGETALL', k)}
"""

# ARGV: P, worker, token, lease_s, any('1'|'0'), type...
_LEASE = _PRELUDE + r"""
local t = now()
local any = ARGV[5] == '1'
local types = {}
local type_list = {}
for i = 6, #ARGV do types[ARGV[i]] = true; type_list[#type_list + 1] = ARGV[i] end
-- expired leases: cancel / fail those that may not run again; remember the oldest re-runnable one
local pick, pick_at = nil, nil
local function better(id, at) return pick == nil or at < pick_at or (at == pick_at and id < pick) end
local expired = redis.call('ZRANGEBYSCORE', P .. ':leases', '-inf', '(' .. fmt(t), 'LIMIT', 0, 200)
for _, id in ipairs(expired) do
  local k = tkey(id)
  local f = redis.call('HMGET', k, 'status', 'lease_expires_at', 'cancel_requested', 'attempts', 'max_attempts',
                       'type', 'created_at')
  if f[1] ~= 'running' then
    redis.call('ZREM', P .. ':leases', id)
  elseif tonumber(f[2]) and tonumber(f[2]) < t then
    if f[3] == '1' then
      end_task(id, 'cancelled', t, '{"status":"cancelled"}')
    elseif tonumber(f[4]) >= tonumber(f[5]) then
      local err = '{"code":"lease_expired","message":"lease expired after ' .. f[4] .. ' attempt(s)"}'
      redis.call('HSET', k, 'error', err)
      end_task(id, 'failed', t, '{"status":"failed","error":' .. err .. '}')
    elseif (any or types[f[6]]) and better(id, tonumber(f[7])) then
      pick, pick_at = id, tonumber(f[7])
    end
  end
end
local function consider(zkey)
  local r = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
  if r[1] and better(r[1], tonumber(r[2])) then pick, pick_at = r[1], tonumber(r[2]) end
end
if any then
  consider(P .. ':queued')
else
  for _, ty in ipairs(type_list) do consider(P .. ':queued:' .. ty) end
end
if pick == nil then return false end
local k = tkey(pick)
local attempts = redis.call('HINCRBY', k, 'attempts', 1)
local exp = fmt(t + tonumber(ARGV[4]))
redis.call('HSET', k, 'status', 'running', 'lease_worker', ARGV[2], 'lease_token', ARGV[3],
  'lease_expires_at', exp, 'updated_at', fmt(t))
if redis.call('HEXISTS', k, 'started_at') == 0 then redis.call('HSET', k, 'started_at', fmt(t)) end
unqueue(pick, redis.call('HGET', k, 'type'))
redis.call('ZADD', P .. ':leases', exp, pick)
add_event(pick, 'status', '{"status":"running","attempt":' .. attempts .. '}', fmt(t))
return redis.call('HGETALL', k)
"""

# ARGV: P, id, token, lease_s
_RENEW = _PRELUDE + r"""
local k = tkey(ARGV[2])
if not current(k, ARGV[3]) then return 'lost' end
local t = now()
local exp = fmt(t + tonumber(ARGV[4]))
redis.call('HSET', k, 'lease_expires_at', exp, 'updated_at', fmt(t))
redis.call('ZADD', P .. ':leases', exp, ARGV[2])
if redis.call('HGET', k, 'cancel_requested') == '1' then return 'cancel_requested' end
return 'ok'
"""

# ARGV: P, id, token, status, result_json, error_json|'', event_data
_FINISH = _PRELUDE + r"""
local k = tkey(ARGV[2])
if not current(k, ARGV[3]) then return 0 end
redis.call('HSET', k, 'result', ARGV[5])
if ARGV[6] ~= '' then redis.call('HSET', k, 'error', ARGV[6]) else redis.call('HDEL', k, 'error') end
end_task(ARGV[2], ARGV[4], now(), ARGV[7])
return 1
"""

# ARGV: P, id, token, count_attempt('1'|'0')
_RELEASE = _PRELUDE + r"""
local id = ARGV[2]
local k = tkey(id)
if not current(k, ARGV[3]) then return 0 end
local t = now()
if redis.call('HGET', k, 'cancel_requested') == '1' then
  end_task(id, 'cancelled', t, '{"status":"cancelled"}')
  return 1
end
if ARGV[4] ~= '1' then
  local a = tonumber(redis.call('HGET', k, 'attempts'))
  redis.call('HSET', k, 'attempts', math.max(0, a - 1))
end
redis.call('HSET', k, 'status', 'queued', 'updated_at', fmt(t))
redis.call('HDEL', k, 'lease_worker', 'lease_token', 'lease_expires_at')
redis.call('ZREM', P .. ':leases', id)
local f = redis.call('HMGET', k, 'created_at', 'type')
redis.call('ZADD', P .. ':queued', f[1], id)
redis.call('ZADD', P .. ':queued:' .. f[2], f[1], id)
add_event(id, 'status', '{"status":"queued","reason":"released"}', fmt(t))
return 1
"""

# ARGV: P, id, check_owner('1'|'0'), owner
_CANCEL = _PRELUDE + r"""
local id = ARGV[2]
local k = tkey(id)
local f = redis.call('HMGET', k, 'owner', 'status', 'cancel_requested')
if not f[1] or (ARGV[3] == '1' and f[1] ~= ARGV[4]) then return false end
local t = now()
if f[2] == 'queued' then
  end_task(id, 'cancelled', t, '{"status":"cancelled"}')
elseif f[2] == 'running' and f[3] ~= '1' then
  redis.call('HSET', k, 'cancel_requested', 1, 'updated_at', fmt(t))
  add_event(id, 'cancel_requested', '{}', fmt(t))
end
return redis.call('HGETALL', k)
"""

# ARGV: P, id, token, field, value, event_type|'', event_data
_LEASED_SET = _PRELUDE + r"""
local k = tkey(ARGV[2])
if not current(k, ARGV[3]) then return 0 end
local t = fmt(now())
redis.call('HSET', k, ARGV[4], ARGV[5], 'updated_at', t)
if ARGV[6] ~= '' then add_event(ARGV[2], ARGV[6], ARGV[7], t) end
return 1
"""

# ARGV: P, id, type, data
_APPEND_EVENT = _PRELUDE + r"""
if redis.call('EXISTS', tkey(ARGV[2])) == 0 then return false end
local ts = fmt(now())
return {add_event(ARGV[2], ARGV[3], ARGV[4], ts), ts}
"""

# ARGV: P, at|'', batch
_PURGE = _PRELUDE + r"""
local bound = ARGV[2] ~= '' and ('(' .. ARGV[2]) or ('(' .. fmt(now()))
local ids = redis.call('ZRANGEBYSCORE', P .. ':ended', '-inf', bound, 'LIMIT', 0, tonumber(ARGV[3]))
local n = 0
for _, id in ipairs(ids) do
  local k = tkey(id)
  local f = redis.call('HMGET', k, 'owner', 'status', '_idem')
  if f[2] == 'succeeded' or f[2] == 'failed' or f[2] == 'cancelled' then
    if f[3] and redis.call('GET', f[3]) == id then redis.call('DEL', f[3]) end
    redis.call('ZREM', P .. ':owner:' .. f[1] .. ':tasks', id)
    redis.call('DEL', k, k .. ':events')
    n = n + 1
  end
  redis.call('ZREM', P .. ':ended', id)
end
return {n, #ids}
"""


# ------------------------------------------------------------------------------------------------------ tasks


def _float(h: dict[str, str], name: str) -> float | None:
    v = h.get(name)
    return float(v) if v not in (None, "") else None


def _task(h: dict[str, str]) -> TaskRecord:
    progress, error = h.get("progress"), h.get("error")
    return TaskRecord(
        id=h["id"], owner=h["owner"], type=h["type"], status=h["status"],  # type: ignore[arg-type]
        input=json.loads(h.get("input") or "{}"), options=json.loads(h.get("options") or "{}"),
        idempotency_key=h.get("idempotency_key") or None, session_id=h.get("session_id") or None,
        created_at=float(h["created_at"]), updated_at=float(h["updated_at"]),
        started_at=_float(h, "started_at"), finished_at=_float(h, "finished_at"),
        attempts=int(h.get("attempts", 0)), max_attempts=int(h.get("max_attempts", 3)),
        progress=Progress.model_validate_json(progress) if progress else None,
        result=json.loads(h["result"]) if "result" in h else None,
        error=TaskError.model_validate_json(error) if error else None,
        cancel_requested=h.get("cancel_requested") == "1", retention_s=float(h["retention_s"]),
        expires_at=_float(h, "expires_at"), last_event_id=int(h.get("last_event_id", 0)),
        lease_worker=h.get("lease_worker") or None, lease_token=h.get("lease_token") or None,
        lease_expires_at=_float(h, "lease_expires_at"),
    )


def _event_from_entry(task_id: str, entry_id: str, fields: dict[str, str]) -> TaskEvent:
    return TaskEvent(id=int(entry_id.split("-", 1)[0]), task_id=task_id, type=fields["type"],
                     data=json.loads(fields["data"]), ts=float(fields["ts"]))


def _encode_cursor(score: float, task_id: str) -> str:
    return base64.urlsafe_b64encode(_dumps([score, task_id]).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        score, task_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return float(score), str(task_id)
    except (ValueError, TypeError) as exc:
        raise InvalidCursor("invalid cursor") from exc


class RedisTaskStore:
    """:class:`~connectors.stores.base.TaskStore` on Redis (see the module docstring for the keys)."""

    def __init__(self, redis: str | Redis, *, key_prefix: str = "kr", acks: ReplicaAcks | None = None) -> None:
        self.redis, self._owned = _client(redis, decode_responses=True)
        self.prefix = key_prefix
        self.acks = acks or ReplicaAcks()
        reg = self.redis.register_script
        self._submit, self._lease, self._renew = reg(_SUBMIT), reg(_LEASE), reg(_RENEW)
        self._finish, self._release, self._cancel = reg(_FINISH), reg(_RELEASE), reg(_CANCEL)
        self._leased_set, self._append, self._purge = reg(_LEASED_SET), reg(_APPEND_EVENT), reg(_PURGE)

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def _call(self, script: Any, *args: Any) -> Any:
        """Run a write script; with required replica acks it returns only once they confirmed it."""
        try:
            return await write_and_wait(self.redis, self.acks, script, [self.prefix, *args])
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def submit(
        self, owner: str, submission: TaskSubmission, *, max_attempts: int = 3, retention_s: float = 7 * 24 * 3600.0
    ) -> tuple[TaskRecord, bool]:
        key = submission.idempotency_key
        idem = self._k("idem", hashlib.sha1(f"{owner}\0{key}".encode()).hexdigest()) if key is not None else ""
        created, flat = await self._call(
            self._submit, new_id("task"), owner, submission.type, _dumps(submission.input),
            _dumps(submission.options), key or "", int(max_attempts), repr(float(retention_s)), idem,
        )
        return _task(_pairs(flat)), bool(created)

    async def get(self, task_id: str, owner: str | None) -> TaskRecord | None:
        try:
            h = await self.redis.hgetall(self._k("task", task_id))
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        if not h or (owner is not None and h.get("owner") != owner):
            return None
        return _task(h)

    async def list(
        self, owner: str, *, status: str | None = None, type: str | None = None, limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """Walks the owner's index newest first (ties on created_at: larger id first) from the cursor,
        filtering in batches; the cursor is the (created_at, id) of the last task returned."""
        limit = max(1, min(int(limit), 500))
        pos = _decode_cursor(cursor) if cursor else None
        try:
            out, more = await self._list_from(self._k("owner", owner, "tasks"), owner, pos, status, type, limit)
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        next_cursor = _encode_cursor(out[-1].created_at, out[-1].id) if more and out else None
        return TaskPage(tasks=out, next_cursor=next_cursor)

    async def _list_from(self, index: str, owner: str, pos: tuple[float, str] | None, status: str | None,
                         type: str | None, limit: int) -> tuple[list[TaskRecord], bool]:
        """The walk of :meth:`list` (its Redis errors become StoreError there): (tasks, more after them)."""
        out: list[TaskRecord] = []
        batch = max(2 * limit, 50)
        more = False
        while True:
            hi = repr(pos[0]) if pos else "+inf"
            rows = await self.redis.zrevrangebyscore(index, hi, "-inf", start=0, num=batch, withscores=True)
            fresh = [(m, s) for m, s in rows if pos is None or s < pos[0] or m < pos[1]]
            if not fresh:
                if len(rows) == batch:  # a whole batch of ties already seen: look further
                    batch *= 2
                    continue
                break
            pipe = self.redis.pipeline(transaction=False)
            for m, _ in fresh:
                pipe.hgetall(self._k("task", m))
            for (m, s), h in zip(fresh, await pipe.execute()):
                pos = (s, m)
                if not h or h.get("owner") != owner:
                    continue
                if (status is None or h["status"] == status) and (type is None or h["type"] == type):
                    if len(out) == limit:
                        more = True
                        break
                    out.append(_task(h))
            if more or len(rows) < batch:
                break
        return out, more

    async def cancel(self, task_id: str, owner: str | None) -> TaskRecord | None:
        flat = await self._call(self._cancel, task_id, "0" if owner is None else "1", owner or "")
        return _task(_pairs(flat)) if flat else None

    async def lease(self, worker_id: str, *, lease_s: float, types: list[str] | None = None) -> Lease | None:
        if types is not None and not types:
            return None
        token = new_id("lease")
        flat = await self._call(self._lease, worker_id, token, repr(float(lease_s)),
                                "1" if types is None else "0", *(types or []))
        if not flat:
            return None
        rec = _task(_pairs(flat))
        assert rec.lease_expires_at is not None
        return Lease(task=rec, token=token, worker_id=worker_id, expires_at=rec.lease_expires_at)

    async def renew(self, lease: Lease, lease_s: float) -> LeaseState:
        return await self._call(self._renew, lease.task.id, lease.token, repr(float(lease_s)))

    async def set_session(self, lease: Lease, session_id: str) -> bool:
        return bool(await self._call(self._leased_set, lease.task.id, lease.token, "session_id", session_id, "", ""))

    async def set_progress(self, lease: Lease, progress: Progress) -> bool:
        body = progress.model_dump_json()
        return bool(await self._call(self._leased_set, lease.task.id, lease.token, "progress", body, "progress", body))

    async def append_event(self, task_id: str, type: str, data: dict[str, Any]) -> TaskEvent:
        body = _dumps(data)
        out = await self._call(self._append, task_id, type, body)
        if not out:
            raise NotFound(f"no task {task_id}")
        return TaskEvent(id=int(out[0]), task_id=task_id, type=type, data=json.loads(body), ts=float(out[1]))

    async def events(self, task_id: str, after: int = 0, limit: int = 1000) -> list[TaskEvent]:
        try:
            rows = await self.redis.xrange(self._k("task", task_id, "events"), min=f"{after + 1}-0", count=limit)
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        return [_event_from_entry(task_id, i, f) for i, f in rows]

    async def wait_events(self, task_id: str, after: int, timeout_s: float, limit: int = 1000) -> list[TaskEvent]:
        """``XREAD BLOCK`` on the task's stream: wakes as soon as an event is appended. With a socket timeout
        (Sentinel clients) the block stays below it and may return empty early, which the contract allows."""
        evs = await self.events(task_id, after, limit)
        if evs or timeout_s <= 0:
            return evs
        key = self._k("task", task_id, "events")
        block_s = timeout_s
        socket_timeout = self.redis.connection_pool.connection_kwargs.get("socket_timeout")
        if socket_timeout:  # a block longer than the socket timeout would read as a dead server: wait less
            block_s = min(block_s, max(0.1, socket_timeout - 1.0))
        try:
            got = await self.redis.xread({key: f"{after}-1"}, count=limit, block=max(1, int(block_s * 1000)))
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        return [_event_from_entry(task_id, i, f) for _, entries in got for i, f in entries]

    async def finish(
        self, lease: Lease, status: Literal["succeeded", "failed", "cancelled"], *, result: Any = None,
        error: TaskError | None = None,
    ) -> bool:
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"finish status must be one of {sorted(TERMINAL_STATUSES)}, got {status!r}")
        event: dict[str, Any] = {"status": status}
        if error is not None:
            event["error"] = error.model_dump()
        done = await self._call(self._finish, lease.task.id, lease.token, status, _dumps(result),
                                error.model_dump_json() if error is not None else "", _dumps(event))
        return bool(done)

    async def release(self, lease: Lease, *, count_attempt: bool = False) -> bool:
        return bool(await self._call(self._release, lease.task.id, lease.token, "1" if count_attempt else "0"))

    async def purge_expired(self, at: float | None = None) -> int:
        total = 0
        while True:
            n, seen = await self._call(self._purge, "" if at is None else repr(float(at)), 500)
            total += int(n)
            if int(seen) < 500:
                return total

    async def close(self) -> None:
        if self._owned:
            await self.redis.aclose()


# --------------------------------------------------------------------------------------------------- sessions

_SESS_PRELUDE = _PRELUDE + r"""
local function skey(id) return P .. ':sess:' .. id end
local SUFFIXES = {'', ':msgs', ':partials', ':children'}
local function live(k, check, owner)
  local o = redis.call('HGET', k, 'owner')
  return o and (check ~= '1' or o == owner)
end
local function touch(k, t)
  redis.call('HSET', k, 'updated_at', fmt(t))
  local ttl = redis.call('HGET', k, 'ttl_ms')
  if ttl and ttl ~= '' then
    redis.call('HSET', k, 'expires_at', fmt(t + tonumber(ttl) / 1000))
    for _, s in ipairs(SUFFIXES) do redis.call('PEXPIRE', k .. s, ttl) end
  end
end
"""

# ARGV: P, id, owner, parent_id|'', ttl_ms|'', metadata field/value pairs...
_SESS_CREATE = _SESS_PRELUDE + r"""
local id, owner, parent, ttl = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local k = skey(id)
local o = redis.call('HGET', k, 'owner')
if o then
  if o ~= owner then return {'taken'} end
  redis.call('HINCRBY', k, 'create_hits', 1)  -- a write: a WAIT after it also covers the first create
  return {'existing', redis.call('HGETALL', k)}
end
if parent ~= '' and not live(skey(parent), '1', owner) then return {'noparent'} end
local t = now()
redis.call('HSET', k, 'id', id, 'owner', owner, 'created_at', fmt(t), 'updated_at', fmt(t),
  'token_count', 0, 'message_count', 0)
if parent ~= '' then redis.call('HSET', k, 'parent_id', parent) end
for i = 6, #ARGV, 2 do redis.call('HSET', k, ARGV[i], ARGV[i + 1]) end
if ttl ~= '' then
  redis.call('HSET', k, 'ttl_ms', ttl, 'expires_at', fmt(t + tonumber(ttl) / 1000))
  redis.call('PEXPIRE', k, ttl)
end
if parent ~= '' then
  local ck = skey(parent) .. ':children'
  redis.call('RPUSH', ck, id)
  local pttl = redis.call('PTTL', skey(parent))
  if pttl > 0 then redis.call('PEXPIRE', ck, pttl) end
end
return {'created', redis.call('HGETALL', k)}
"""

# ARGV: P, id, check, owner, token_count, message-json-without-closing-brace...
_SESS_APPEND = _SESS_PRELUDE + r"""
local k = skey(ARGV[2])
if not live(k, ARGV[3], ARGV[4]) then return false end
local t = now()
local tail = ',"ts":' .. fmt(t) .. '}'
for i = 6, #ARGV do redis.call('RPUSH', k .. ':msgs', ARGV[i] .. tail) end
redis.call('HINCRBY', k, 'message_count', #ARGV - 5)
redis.call('HINCRBY', k, 'token_count', tonumber(ARGV[5]))
touch(k, t)
return redis.call('HGETALL', k)
"""

# ARGV: P, id, check, owner, suffix ('' = the record: metadata fields; ':partials'), field/value pairs...
_SESS_HSET = _SESS_PRELUDE + r"""
local k = skey(ARGV[2])
if not live(k, ARGV[3], ARGV[4]) then return false end
for i = 6, #ARGV, 2 do redis.call('HSET', k .. ARGV[5], ARGV[i], ARGV[i + 1]) end
touch(k, now())
return redis.call('HGETALL', k)
"""

# ARGV: P, id, check, owner
_SESS_DELETE = _SESS_PRELUDE + r"""
local k = skey(ARGV[2])
if not live(k, ARGV[3], ARGV[4]) then return 0 end
local parent = redis.call('HGET', k, 'parent_id')
local stack = {ARGV[2]}
while #stack > 0 do
  local sk = skey(table.remove(stack))
  for _, c in ipairs(redis.call('LRANGE', sk .. ':children', 0, -1)) do stack[#stack + 1] = c end
  for _, s in ipairs(SUFFIXES) do redis.call('DEL', sk .. s) end
end
if parent then redis.call('LREM', skey(parent) .. ':children', 0, ARGV[2]) end
return 1
"""


def _session(h: dict[str, str]) -> SessionRecord:
    return SessionRecord(
        id=h["id"], owner=h["owner"], parent_id=h.get("parent_id") or None,
        created_at=float(h["created_at"]), updated_at=float(h["updated_at"]), expires_at=_float(h, "expires_at"),
        metadata={k[2:]: json.loads(v) for k, v in h.items() if k.startswith("m:")},
        token_count=int(h.get("token_count", 0)), message_count=int(h.get("message_count", 0)),
    )


class RedisSessionStore:
    """:class:`~connectors.stores.base.SessionStore` on Redis; media over ``blob_threshold`` bytes goes to
    ``blobs``. A TTL is a ``PEXPIRE`` on all of the session's keys, renewed by each write."""

    def __init__(self, redis: str | Redis, blobs: BlobStore, *, key_prefix: str = "kr",
                 blob_threshold: int = 64 * 1024, acks: ReplicaAcks | None = None) -> None:
        self.redis, self._owned = _client(redis, decode_responses=True)
        self.prefix = key_prefix
        self.acks = acks or ReplicaAcks()
        self.blobs = blobs
        self.blob_threshold = blob_threshold
        reg = self.redis.register_script
        self._create, self._append = reg(_SESS_CREATE), reg(_SESS_APPEND)
        self._hset, self._delete = reg(_SESS_HSET), reg(_SESS_DELETE)

    def _k(self, session_id: str, suffix: str = "") -> str:
        return f"{self.prefix}:sess:{session_id}{suffix}"

    async def _call(self, script: Any, *args: Any) -> Any:
        """Run a write script; with required replica acks it returns only once they confirmed it."""
        try:
            return await write_and_wait(self.redis, self.acks, script, [self.prefix, *args])
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc

    @staticmethod
    def _who(owner: str | None) -> tuple[str, str]:
        return ("0", "") if owner is None else ("1", owner)

    async def create(
        self, owner: str, *, parent_id: str | None = None, metadata: dict[str, Any] | None = None,
        ttl_s: float | None = None, session_id: str | None = None,
    ) -> SessionRecord:
        fields = [x for k, v in (metadata or {}).items() for x in (f"m:{k}", _dumps(v))]
        ttl_ms = "" if ttl_s is None else str(max(1, round(ttl_s * 1000)))
        out = await self._call(self._create, session_id or new_id("sess"), owner, parent_id or "", ttl_ms, *fields)
        if out[0] == "taken":
            raise StoreError("session id taken")
        if out[0] == "noparent":
            raise NotFound(f"no session {parent_id}")
        return _session(_pairs(out[1]))

    async def get(self, session_id: str, owner: str | None) -> SessionRecord | None:
        try:
            h = await self.redis.hgetall(self._k(session_id))
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        if not h or (owner is not None and h.get("owner") != owner):
            return None
        return _session(h)

    async def _need(self, session_id: str, owner: str | None) -> SessionRecord:
        rec = await self.get(session_id, owner)
        if rec is None:
            raise NotFound(f"no session {session_id}")
        return rec

    async def append(
        self, session_id: str, owner: str | None, messages: list[dict[str, Any]], *, token_count: int = 0
    ) -> SessionRecord:
        rec = await self._need(session_id, owner)
        stored, _ = await media.externalize(messages, self.blobs, rec.owner, self.blob_threshold)
        bodies = []
        for msg in stored:
            if not isinstance(msg.get("role"), str):
                raise StoreError("a session message needs a string 'role'")
            body = {k: v for k, v in msg.items() if k not in ("index", "ts")}
            body.setdefault("content", None)
            body["token_count"] = int(body.get("token_count") or 0)
            bodies.append(_dumps(body)[:-1])  # the script closes it with ,"ts":<server time>}
        if not bodies and not token_count:
            return rec
        flat = await self._call(self._append, session_id, *self._who(owner), int(token_count), *bodies)
        if not flat:
            raise NotFound(f"no session {session_id}")
        return _session(_pairs(flat))

    async def messages(
        self, session_id: str, owner: str | None, *, start: int = 0, end: int | None = None,
        resolve_media: bool = False,
    ) -> list[SessionMessage]:
        rec = await self._need(session_id, owner)
        lo, hi, _ = slice(start, end).indices(rec.message_count)
        if hi <= lo:
            return []
        try:
            rows = await self.redis.lrange(self._k(session_id, ":msgs"), lo, hi - 1)
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        out = [SessionMessage(index=lo + i, **json.loads(r)) for i, r in enumerate(rows)]
        if resolve_media:
            resolved = await media.resolve([{"content": m.content} for m in out], self.blobs, rec.owner)
            for m, r in zip(out, resolved):
                m.content = r["content"]
        return out

    async def set_partial(self, session_id: str, owner: str | None, key: str, value: Any) -> None:
        if not await self._call(self._hset, session_id, *self._who(owner), ":partials", key, _dumps(value)):
            raise NotFound(f"no session {session_id}")

    async def partials(self, session_id: str, owner: str | None) -> dict[str, Any]:
        await self._need(session_id, owner)
        try:
            h = await self.redis.hgetall(self._k(session_id, ":partials"))
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        return {k: json.loads(v) for k, v in h.items()}

    async def update_metadata(self, session_id: str, owner: str | None, metadata: dict[str, Any]) -> SessionRecord:
        fields = [x for k, v in metadata.items() for x in (f"m:{k}", _dumps(v))]
        flat = await self._call(self._hset, session_id, *self._who(owner), "", *fields)
        if not flat:
            raise NotFound(f"no session {session_id}")
        return _session(_pairs(flat))

    async def children(self, session_id: str, owner: str | None) -> list[SessionRecord]:
        await self._need(session_id, owner)
        try:
            ids = await self.redis.lrange(self._k(session_id, ":children"), 0, -1)
            pipe = self.redis.pipeline(transaction=False)
            for cid in ids:
                pipe.hgetall(self._k(cid))
            rows = await pipe.execute() if ids else []
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        return [_session(h) for h in rows if h]

    async def delete(self, session_id: str, owner: str | None) -> bool:
        return bool(await self._call(self._delete, session_id, *self._who(owner)))

    async def purge_expired(self, at: float | None = None) -> int:
        """Nothing to do: Redis expires the keys itself (here for parity with the SQLite store)."""
        return 0

    async def close(self) -> None:
        if self._owned:
            await self.redis.aclose()


# ------------------------------------------------------------------------------------------------------ blobs


# ARGV: data key, meta key, bytes, size, content_type (a script, not MULTI: WAIT must follow on the same connection)
_BLOB_PUT = r"""
redis.call('SET', ARGV[1], ARGV[3])
redis.call('HSETNX', ARGV[2], 'size', ARGV[4])
redis.call('HSETNX', ARGV[2], 'content_type', ARGV[5])
return 1
"""


class RedisBlobStore:
    """:class:`~connectors.stores.base.BlobStore` on Redis: bytes under their own key (never inside a session
    value), metadata beside them; the first put of some content wins, later ones return its ref."""

    def __init__(self, redis: str | Redis, *, key_prefix: str = "kr", acks: ReplicaAcks | None = None) -> None:
        self.redis, self._owned = _client(redis, decode_responses=False)
        self.prefix = key_prefix
        self.acks = acks or ReplicaAcks()
        self._put = self.redis.register_script(_BLOB_PUT)

    def _keys(self, owner: str, ref: str) -> tuple[str, str]:
        return f"{self.prefix}:blob:{owner}:{ref}", f"{self.prefix}:blobmeta:{owner}:{ref}"

    async def put(self, owner: str, data: bytes, content_type: str = "application/octet-stream") -> BlobRef:
        data = bytes(data)
        ref = hashlib.sha256(data).hexdigest()
        existing = await self.info(owner, ref)
        if existing is not None:
            return existing
        dkey, mkey = self._keys(owner, ref)
        try:
            await write_and_wait(self.redis, self.acks, self._put, [dkey, mkey, data, len(data), content_type])
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        return await self.info(owner, ref) or BlobRef(ref=ref, size=len(data), content_type=content_type)

    async def get(self, owner: str, ref: str) -> bytes | None:
        try:
            return await self.redis.get(self._keys(owner, ref)[0])
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def info(self, owner: str, ref: str) -> BlobRef | None:
        try:
            h = await self.redis.hgetall(self._keys(owner, ref)[1])
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc
        if not h:
            return None
        return BlobRef(ref=ref, size=int(h[b"size"]), content_type=h[b"content_type"].decode())

    async def delete(self, owner: str, ref: str) -> bool:
        try:
            return bool(await self.redis.delete(*self._keys(owner, ref)))
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def close(self) -> None:
        if self._owned:
            await self.redis.aclose()
