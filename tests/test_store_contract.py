"""The store contract (connectors/stores/base.py), run against both implementations: embedded SQLite + files
and Redis (a real redis-server, see tests/redis_harness.py). Plus what only one of them has to prove: Redis
keeps its data and its clients keep working across a server crash; SQLite is safe for several processes."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from connectors.stores import (
    NotFound,
    Progress,
    StoreError,
    Stores,
    TaskError,
    TaskSubmission,
    media,
    open_stores,
    stores_url_from_env,
)
from redis_harness import RedisServer, SentinelCluster, redis_server, require_redis_server, sentinel_cluster

REPO = Path(__file__).resolve().parents[1]
Opener = Callable[..., Stores]


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory):
    require_redis_server()
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def shared_sentinel(tmp_path_factory: pytest.TempPathFactory):
    require_redis_server()
    with sentinel_cluster(tmp_path_factory.mktemp("sentinel")) as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", "redis", "sentinel"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the stores of one backend; Redis gets a fresh key prefix per test, SQLite a fresh directory.
    ``sentinel``: a primary + replica + 3 sentinels, every write confirmed by the replica (WAIT)."""
    if request.param == "sentinel":
        cluster: SentinelCluster = request.getfixturevalue("shared_sentinel")
        prefix = f"t{uuid.uuid4().hex[:10]}"
        return lambda **kw: open_stores(cluster.url, key_prefix=prefix, **kw)
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("shared_redis")
        prefix = f"t{uuid.uuid4().hex[:10]}"
        return lambda **kw: open_stores(server.url, key_prefix=prefix, **kw)
    return lambda **kw: open_stores(f"sqlite://{tmp_path / 'stores'}", **kw)


def run(opener: Opener, fn: Callable[[Stores], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        stores = opener(**kw)
        try:
            return await fn(stores)
        finally:
            await stores.close()

    return asyncio.run(main())


def sub(type: str = "echo", **kw: Any) -> TaskSubmission:
    return TaskSubmission(type=type, **kw)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def noise_png(side: int = 200, seed: int = 0) -> bytes:
    """A PNG that does not compress: side=200 is ~120 KB, over the default 64 KiB threshold."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------ tasks


def test_submit_get_and_first_event(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        before = time.time()
        rec, created = await st.tasks.submit("alice", sub(input={"q": [1, 2.5, "x"]}, options={"o": True}))
        assert created and rec.status == "queued" and rec.id.startswith("task_") and rec.owner == "alice"
        assert rec.input == {"q": [1, 2.5, "x"]} and rec.options == {"o": True} and rec.attempts == 0
        assert before - 1 <= rec.created_at <= time.time() + 1 and rec.last_event_id == 1
        assert await st.tasks.get(rec.id, "alice") == rec
        assert await st.tasks.get(rec.id, None) == rec
        assert await st.tasks.get(rec.id, "mallory") is None
        assert await st.tasks.get("task_missing", "alice") is None
        [ev] = await st.tasks.events(rec.id)
        assert (ev.id, ev.type, ev.data) == (1, "status", {"status": "queued"})

    run(opener, body)


def test_idempotency_replay(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        a, created = await st.tasks.submit("alice", sub(idempotency_key="k1", input={"n": 1}))
        b, again = await st.tasks.submit("alice", sub(idempotency_key="k1", input={"n": 2}))
        assert created and not again and b.id == a.id and b.input == {"n": 1}
        other, created_other = await st.tasks.submit("bob", sub(idempotency_key="k1"))
        assert created_other and other.id != a.id
        lease = await st.tasks.lease("w", lease_s=30)
        assert lease is not None and lease.task.id == a.id
        assert await st.tasks.finish(lease, "succeeded", result=1)
        c, created_c = await st.tasks.submit("alice", sub(idempotency_key="k1"))
        assert not created_c and c.id == a.id and c.status == "succeeded"  # ended, not yet purged
        assert await st.tasks.purge_expired(time.time() + 8 * 24 * 3600) == 1
        d, created_d = await st.tasks.submit("alice", sub(idempotency_key="k1"))
        assert created_d and d.id != a.id

    run(opener, body)


def test_lease_fifo_by_type(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        a, _ = await st.tasks.submit("o", sub("x"))
        b, _ = await st.tasks.submit("o", sub("y"))
        c, _ = await st.tasks.submit("o", sub("x"))
        assert await st.tasks.lease("w", lease_s=30, types=[]) is None
        assert await st.tasks.lease("w", lease_s=30, types=["z"]) is None
        lb = await st.tasks.lease("w1", lease_s=30, types=["y", "z"])
        assert lb is not None and lb.task.id == b.id and lb.worker_id == "w1"
        la = await st.tasks.lease("w2", lease_s=30, types=["x"])
        lc = await st.tasks.lease("w3", lease_s=30)
        assert la is not None and lc is not None and (la.task.id, lc.task.id) == (a.id, c.id)
        assert await st.tasks.lease("w4", lease_s=30) is None
        t = la.task
        assert t.status == "running" and t.attempts == 1 and t.started_at is not None
        assert t.lease_token == la.token and t.lease_worker == "w2" and la.expires_at == t.lease_expires_at
        assert la.expires_at > time.time() + 20
        evs = await st.tasks.events(a.id)
        assert [(e.id, e.data) for e in evs] == [(1, {"status": "queued"}), (2, {"status": "running", "attempt": 1})]

    run(opener, body)


def test_concurrent_lease_leases_each_task_once(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        ids = {(await st.tasks.submit("o", sub()))[0].id for _ in range(10)}
        leases = await asyncio.gather(*(st.tasks.lease(f"w{i}", lease_s=30) for i in range(20)))
        got = [lease.task.id for lease in leases if lease is not None]
        assert sorted(got) == sorted(ids)  # every task once, none twice
        assert sum(lease is None for lease in leases) == 10

    run(opener, body)


def test_expired_lease_is_reclaimed(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        rec, _ = await st.tasks.submit("o", sub(), max_attempts=3)
        first = await st.tasks.lease("w1", lease_s=0.05)
        assert first is not None
        await asyncio.sleep(0.15)
        second = await st.tasks.lease("w2", lease_s=30)
        assert second is not None and second.task.id == rec.id and second.task.attempts == 2
        assert second.task.started_at == first.task.started_at and second.token != first.token
        assert await st.tasks.renew(first, 30) == "lost"
        assert not await st.tasks.finish(first, "succeeded", result="stale")
        assert not await st.tasks.set_progress(first, Progress(done=1))
        assert not await st.tasks.release(first)
        assert await st.tasks.renew(second, 30) == "ok"
        evs = await st.tasks.events(rec.id)
        assert [e.data for e in evs] == [{"status": "queued"}, {"status": "running", "attempt": 1},
                                          {"status": "running", "attempt": 2}]

    run(opener, body)


def test_max_attempts_exhausted_fails_with_lease_expired(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        rec, _ = await st.tasks.submit("o", sub(), max_attempts=2)
        for _ in range(2):
            assert await st.tasks.lease("w", lease_s=0.05) is not None
            await asyncio.sleep(0.12)
        later, _ = await st.tasks.submit("o", sub())
        nxt = await st.tasks.lease("w", lease_s=30)  # fails the exhausted task, then leases the next one
        assert nxt is not None and nxt.task.id == later.id
        dead = await st.tasks.get(rec.id, "o")
        assert dead is not None and dead.status == "failed" and dead.error is not None
        assert dead.error.code == "lease_expired" and dead.attempts == 2
        assert dead.lease_token is None and dead.finished_at is not None
        assert dead.expires_at == pytest.approx(dead.finished_at + dead.retention_s)
        last = (await st.tasks.events(rec.id))[-1]
        assert last.data["status"] == "failed" and last.data["error"]["code"] == "lease_expired"

    run(opener, body)


def test_expired_lease_with_cancel_requested_is_cancelled(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        rec, _ = await st.tasks.submit("o", sub())
        assert await st.tasks.lease("w", lease_s=0.05) is not None
        assert (await st.tasks.cancel(rec.id, "o")).cancel_requested  # type: ignore[union-attr]
        await asyncio.sleep(0.12)
        assert await st.tasks.lease("w", lease_s=30) is None
        got = await st.tasks.get(rec.id, None)
        assert got is not None and got.status == "cancelled" and got.attempts == 1
        assert (await st.tasks.events(rec.id))[-1].data == {"status": "cancelled"}

    run(opener, body)


def test_finish_exactly_once_with_current_token(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        rec, _ = await st.tasks.submit("o", sub(), retention_s=60)
        lease = await st.tasks.lease("w", lease_s=30)
        assert lease is not None
        before = await st.tasks.get(rec.id, "o")
        stale = lease.model_copy(update={"token": "lease_stale"})
        assert not await st.tasks.finish(stale, "succeeded", result={"bad": 1})
        assert await st.tasks.get(rec.id, "o") == before  # nothing written
        assert await st.tasks.finish(lease, "succeeded", result={"answer": [42, "x"]})
        done = await st.tasks.get(rec.id, "o")
        assert done is not None and done.status == "succeeded" and done.result == {"answer": [42, "x"]}
        assert done.lease_token is None and done.lease_worker is None and done.lease_expires_at is None
        assert done.finished_at is not None and done.expires_at == pytest.approx(done.finished_at + 60)
        assert not await st.tasks.finish(lease, "failed", error=TaskError(code="x", message="again"))
        assert await st.tasks.get(rec.id, "o") == done
        assert (await st.tasks.events(rec.id))[-1].data == {"status": "succeeded"}

        rec2, _ = await st.tasks.submit("o", sub())
        lease2 = await st.tasks.lease("w", lease_s=30)
        assert lease2 is not None and lease2.task.id == rec2.id
        err = TaskError(code="agent_error", message="boom")
        assert await st.tasks.finish(lease2, "failed", error=err)
        failed = await st.tasks.get(rec2.id, "o")
        assert failed is not None and failed.status == "failed" and failed.error == err
        assert (await st.tasks.events(rec2.id))[-1].data == {"status": "failed", "error": err.model_dump()}

    run(opener, body)


def test_renew_states(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        rec, _ = await st.tasks.submit("o", sub())
        lease = await st.tasks.lease("w", lease_s=5)
        assert lease is not None
        assert await st.tasks.renew(lease, 60) == "ok"
        t1 = (await st.tasks.get(rec.id, "o")).lease_expires_at  # type: ignore[union-attr]
        assert t1 is not None and t1 > lease.expires_at + 50
        await st.tasks.cancel(rec.id, "o")
        assert await st.tasks.renew(lease, 120) == "cancel_requested"
        t2 = (await st.tasks.get(rec.id, "o")).lease_expires_at  # type: ignore[union-attr]
        assert t2 is not None and t2 > t1 + 50  # still extended
        assert await st.tasks.renew(lease.model_copy(update={"token": "nope"}), 60) == "lost"
        assert await st.tasks.finish(lease, "cancelled")
        assert await st.tasks.renew(lease, 60) == "lost"

    run(opener, body)


def test_release_requeues(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        rec, _ = await st.tasks.submit("o", sub())
        lease = await st.tasks.lease("w", lease_s=30)
        assert lease is not None
        assert await st.tasks.release(lease)
        back = await st.tasks.get(rec.id, "o")
        assert back is not None and back.status == "queued" and back.attempts == 0 and back.lease_token is None
        assert (await st.tasks.events(rec.id))[-1].data == {"status": "queued", "reason": "released"}
        assert not await st.tasks.release(lease)  # token gone
        again = await st.tasks.lease("w", lease_s=30)
        assert again is not None and again.task.id == rec.id and again.task.attempts == 1
        assert await st.tasks.release(again, count_attempt=True)
        assert (await st.tasks.get(rec.id, "o")).attempts == 1  # type: ignore[union-attr]

    run(opener, body)


def test_cancel(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        queued, _ = await st.tasks.submit("alice", sub("q"))
        assert await st.tasks.cancel(queued.id, "mallory") is None
        assert await st.tasks.cancel("task_missing", "alice") is None
        c = await st.tasks.cancel(queued.id, "alice")
        assert c is not None and c.status == "cancelled" and c.finished_at is not None
        assert c.expires_at == pytest.approx(c.finished_at + c.retention_s)
        assert (await st.tasks.events(queued.id))[-1].data == {"status": "cancelled"}
        assert await st.tasks.lease("w", lease_s=30, types=["q"]) is None  # gone from the queue

        running, _ = await st.tasks.submit("alice", sub("r"))
        lease = await st.tasks.lease("w", lease_s=30, types=["r"])
        assert lease is not None
        r = await st.tasks.cancel(running.id, None)  # trusted caller
        assert r is not None and r.status == "running" and r.cancel_requested
        ev = (await st.tasks.events(running.id))[-1]
        assert (ev.type, ev.data) == ("cancel_requested", {})
        assert await st.tasks.finish(lease, "cancelled")
        n_events = len(await st.tasks.events(running.id))
        ended = await st.tasks.cancel(running.id, "alice")
        assert ended is not None and ended.status == "cancelled"
        assert len(await st.tasks.events(running.id)) == n_events  # terminal: unchanged

    run(opener, body)


def test_progress_session_and_events_without_gaps(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        rec, _ = await st.tasks.submit("o", sub())
        lease = await st.tasks.lease("w", lease_s=30)
        assert lease is not None
        prog = Progress(done=3, total=10, message="pages")
        assert await st.tasks.set_progress(lease, prog)
        assert await st.tasks.set_session(lease, "sess_abc")
        got = await st.tasks.get(rec.id, "o")
        assert got is not None and got.progress == prog and got.session_id == "sess_abc"
        ev = (await st.tasks.events(rec.id))[-1]
        assert (ev.type, ev.data) == ("progress", prog.model_dump())
        stale = lease.model_copy(update={"token": "lease_x"})
        assert not await st.tasks.set_progress(stale, Progress(done=9))
        assert not await st.tasks.set_session(stale, "sess_other")

        added = await asyncio.gather(*(st.tasks.append_event(rec.id, "log", {"i": i}) for i in range(20)))
        assert sorted(e.id for e in added) == list(range(4, 24))
        evs = await st.tasks.events(rec.id)
        assert [e.id for e in evs] == list(range(1, 24))
        assert (await st.tasks.get(rec.id, "o")).last_event_id == 23  # type: ignore[union-attr]
        assert [e.id for e in await st.tasks.events(rec.id, after=10, limit=5)] == [11, 12, 13, 14, 15]
        assert await st.tasks.events(rec.id, after=23) == []
        with pytest.raises(NotFound):
            await st.tasks.append_event("task_missing", "log", {})

    run(opener, body)


def test_wait_events_wakes_on_append(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        rec, _ = await st.tasks.submit("o", sub())
        assert [e.id for e in await st.tasks.wait_events(rec.id, 0, timeout_s=5)] == [1]  # already there

        async def later() -> None:
            await asyncio.sleep(0.2)
            await st.tasks.append_event(rec.id, "log", {"line": "hi"})

        t0 = time.monotonic()
        writer = asyncio.create_task(later())
        evs = await st.tasks.wait_events(rec.id, 1, timeout_s=5)
        waited = time.monotonic() - t0
        await writer
        assert [(e.id, e.data) for e in evs] == [(2, {"line": "hi"})]
        assert 0.15 < waited < 1.0

        t0 = time.monotonic()
        assert await st.tasks.wait_events(rec.id, 2, timeout_s=0.3) == []
        assert 0.25 < time.monotonic() - t0 < 1.5

    run(opener, body)


def test_list_pages_and_filters(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        made = [(await st.tasks.submit("alice", sub("a" if i % 3 else "b")))[0] for i in range(25)]
        await st.tasks.submit("bob", sub())
        seen, cursor, pages = [], None, []
        while True:
            page = await st.tasks.list("alice", limit=10, cursor=cursor)
            pages.append(len(page.tasks))
            seen += page.tasks
            cursor = page.next_cursor
            if cursor is None:
                break
        assert pages == [10, 10, 5]
        assert [t.id for t in seen] == [t.id for t in reversed(made)]  # newest first, no gap, no repeat
        only_b = await st.tasks.list("alice", type="b", limit=500)
        assert [t.id for t in only_b.tasks] == [t.id for t in reversed(made) if t.type == "b"]
        assert only_b.next_cursor is None
        lease = await st.tasks.lease("w", lease_s=30)
        assert lease is not None
        running = await st.tasks.list("alice", status="running")
        assert [t.id for t in running.tasks] == [made[0].id]
        b_queued = await st.tasks.list("alice", status="queued", type="b", limit=2)
        assert len(b_queued.tasks) == 2 and b_queued.next_cursor is not None
        rest = await st.tasks.list("alice", status="queued", type="b", limit=500, cursor=b_queued.next_cursor)
        assert len(rest.tasks) == 9 - 1 - 2  # 9 of type b, one of them running
        assert len((await st.tasks.list("alice", limit=0)).tasks) == 1  # clamped to 1..500
        assert (await st.tasks.list("mallory")).tasks == []

    run(opener, body)


def test_purge_expired(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        old, _ = await st.tasks.submit("o", sub(idempotency_key="k"), retention_s=0.05)
        keep, _ = await st.tasks.submit("o", sub(), retention_s=3600)
        queued, _ = await st.tasks.submit("o", sub(), retention_s=0.05)
        for _ in range(2):
            lease = await st.tasks.lease("w", lease_s=30)
            assert lease is not None and await st.tasks.finish(lease, "succeeded")
        await asyncio.sleep(0.1)
        assert await st.tasks.purge_expired() == 1
        assert await st.tasks.get(old.id, None) is None and await st.tasks.events(old.id) == []
        assert await st.tasks.get(keep.id, None) is not None and await st.tasks.get(queued.id, None) is not None
        assert [t.id for t in (await st.tasks.list("o")).tasks] == [queued.id, keep.id]
        assert (await st.tasks.submit("o", sub(idempotency_key="k")))[1]  # key freed
        assert await st.tasks.purge_expired(time.time() + 7200) == 1
        assert await st.tasks.get(keep.id, None) is None

    run(opener, body)


# --------------------------------------------------------------------------------------------------- sessions


def test_sessions_messages_metadata_partials(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        s = await st.sessions.create("alice", metadata={"title": "t", "n": 1})
        assert s.id.startswith("sess_") and s.expires_at is None and s.message_count == 0
        assert await st.sessions.get(s.id, "alice") == s and await st.sessions.get(s.id, None) == s
        assert await st.sessions.get(s.id, "mallory") is None
        r = await st.sessions.append(s.id, "alice", [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello", "token_count": 3}],
                                     token_count=7)
        assert (r.message_count, r.token_count) == (2, 7)
        r = await st.sessions.append(s.id, None, [{"role": "user", "content": [{"type": "text", "text": "more"}]}],
                                     token_count=2)
        assert (r.message_count, r.token_count) == (3, 9)
        msgs = await st.sessions.messages(s.id, "alice")
        assert [(m.index, m.role) for m in msgs] == [(0, "user"), (1, "assistant"), (2, "user")]
        assert msgs[1].token_count == 3 and msgs[2].content == [{"type": "text", "text": "more"}]
        assert [m.index for m in await st.sessions.messages(s.id, "alice", start=1)] == [1, 2]
        assert [m.index for m in await st.sessions.messages(s.id, "alice", start=0, end=2)] == [0, 1]
        assert [m.index for m in await st.sessions.messages(s.id, "alice", start=-1)] == [2]
        assert await st.sessions.messages(s.id, "alice", start=5) == []
        m = await st.sessions.update_metadata(s.id, "alice", {"n": 2, "extra": {"k": [1]}})
        assert m.metadata == {"title": "t", "n": 2, "extra": {"k": [1]}}
        await st.sessions.set_partial(s.id, "alice", "chunk-0", {"summary": "a"})
        await st.sessions.set_partial(s.id, "alice", "chunk-1", [1, 2])
        await st.sessions.set_partial(s.id, "alice", "chunk-0", {"summary": "b"})
        assert await st.sessions.partials(s.id, "alice") == {"chunk-0": {"summary": "b"}, "chunk-1": [1, 2]}
        for call in (
            st.sessions.append(s.id, "mallory", [{"role": "user", "content": "x"}]),
            st.sessions.messages(s.id, "mallory"),
            st.sessions.partials(s.id, "mallory"),
            st.sessions.set_partial(s.id, "mallory", "k", 1),
            st.sessions.update_metadata(s.id, "mallory", {"a": 1}),
            st.sessions.children(s.id, "mallory"),
            st.sessions.messages("sess_missing", "alice"),
        ):
            with pytest.raises(NotFound):
                await call
        assert not await st.sessions.delete(s.id, "mallory")
        assert (await st.sessions.get(s.id, "alice")).message_count == 3  # type: ignore[union-attr]

    run(opener, body)


def test_sessions_chosen_ids_children_and_delete(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        root = await st.sessions.create("alice", session_id="sess_root", metadata={"a": 1})
        assert root.id == "sess_root"
        assert await st.sessions.create("alice", session_id="sess_root", metadata={"b": 2}) == root  # unchanged
        with pytest.raises(StoreError, match="taken"):
            await st.sessions.create("bob", session_id="sess_root")
        with pytest.raises(NotFound):
            await st.sessions.create("alice", parent_id="sess_missing")
        with pytest.raises(NotFound):
            await st.sessions.create("bob", parent_id=root.id)
        kids = [await st.sessions.create("alice", parent_id=root.id, session_id=f"sess_root_c{i}") for i in (2, 0, 1)]
        grandkid = await st.sessions.create("alice", parent_id=kids[0].id)
        assert [k.id for k in await st.sessions.children(root.id, "alice")] == [k.id for k in kids]  # creation order
        assert all(k.parent_id == root.id for k in kids)
        assert [k.id for k in await st.sessions.children(kids[0].id, None)] == [grandkid.id]
        await st.sessions.append(grandkid.id, "alice", [{"role": "user", "content": "x"}])
        assert await st.sessions.delete(kids[1].id, "alice")
        assert [k.id for k in await st.sessions.children(root.id, "alice")] == [kids[0].id, kids[2].id]
        assert await st.sessions.delete(root.id, "alice")
        for sid in (root.id, kids[0].id, kids[2].id, grandkid.id):
            assert await st.sessions.get(sid, None) is None
        with pytest.raises(NotFound):
            await st.sessions.messages(grandkid.id, None)
        assert not await st.sessions.delete(root.id, "alice")

    run(opener, body)


def test_session_ttl_renewed_by_writes_then_expires(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        s = await st.sessions.create("alice", ttl_s=1.0)
        assert s.expires_at == pytest.approx(s.created_at + 1.0, abs=0.01)
        await asyncio.sleep(0.6)
        r = await st.sessions.append(s.id, "alice", [{"role": "user", "content": "keep me"}])
        assert r.expires_at is not None and r.expires_at > s.expires_at + 0.5
        await st.sessions.set_partial(s.id, "alice", "p", 1)
        await asyncio.sleep(0.6)  # 1.2 s after creation: alive thanks to the renewals
        assert await st.sessions.get(s.id, "alice") is not None
        assert len(await st.sessions.messages(s.id, "alice")) == 1
        await asyncio.sleep(1.1)
        assert await st.sessions.get(s.id, "alice") is None
        with pytest.raises(NotFound):
            await st.sessions.messages(s.id, "alice")
        with pytest.raises(NotFound):
            await st.sessions.partials(s.id, "alice")

    run(opener, body)


def test_session_media_externalized_and_resolved(opener: Opener) -> None:
    big = noise_png()
    big_url = "data:image/png;base64," + base64.b64encode(big).decode()
    small = noise_png(side=8, seed=1)
    video = b"\x00\x00\x00\x18ftypmp42" + os.urandom(80_000)

    async def body(st: Stores) -> None:
        assert len(big) > 64 * 1024 > len(small)
        s = await st.sessions.create("alice")
        content = [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": big_url, "detail": "high"}},
            {"type": "image", "image": big},
            {"type": "image", "image": small},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            {"type": "video", "video": video},
            {"type": "video", "video": {"frames": [big, small], "fps": 1.0}},
        ]
        await st.sessions.append(s.id, "alice", [{"role": "user", "content": content}])
        [stored] = await st.sessions.messages(s.id, "alice")
        json.dumps(stored.model_dump())  # JSON all the way down
        c = stored.content
        assert c[0] == {"type": "text", "text": "look"}
        ref = sha256(big)
        assert c[1] == {"type": "blob_ref", "ref": ref, "content_type": "image/png", "kind": "image",
                        "size": len(big), "extra": {"detail": "high"}}
        assert c[2] == {"type": "blob_ref", "ref": ref, "content_type": "image/png", "kind": "image", "size": len(big)}
        assert c[3]["type"] == "image" and c[3]["image"].startswith("data:image/png;base64,")  # small: inline
        assert c[4] == content[4]
        assert c[5]["kind"] == "video" and c[5]["content_type"] == "video/mp4" and c[5]["size"] == len(video)
        assert c[6]["video"]["fps"] == 1.0 and c[6]["video"]["frames"][0]["type"] == "blob_ref"
        assert await st.blobs.get("alice", ref) == big and await st.blobs.get("mallory", ref) is None

        [full] = await st.sessions.messages(s.id, "alice", resolve_media=True)
        r = full.content
        assert r[1] == {"type": "image", "image": big, "detail": "high"}
        assert r[2] == {"type": "image", "image": big}
        assert r[3] == c[3]
        assert r[5] == {"type": "video", "video": video, "content_type": "video/mp4"}
        assert r[6]["video"]["frames"][0] == big and r[6]["video"]["frames"][1].startswith("data:image/png")

        await st.blobs.delete("alice", ref)
        with pytest.raises(NotFound):
            await st.sessions.messages(s.id, "alice", resolve_media=True)

    run(opener, body)


def test_externalize_file_parts_and_threshold(opener: Opener) -> None:
    pdf = b"%PDF-1.7\n" + os.urandom(3000)

    async def body(st: Stores) -> None:
        msgs = [{"role": "tool", "content": [
            {"type": "file", "file": {"file_data": base64.b64encode(pdf).decode(), "filename": "c.pdf"}},
            {"type": "text", "text": "ok"},
        ], "raw": b"\x01\x02"}]
        out, refs = await media.externalize(msgs, st.blobs, "alice", threshold=1024)
        json.dumps(out)
        assert msgs[0]["content"][0]["file"]["filename"] == "c.pdf"  # input untouched
        part = out[0]["content"][0]
        assert part["kind"] == "file" and part["content_type"] == "application/pdf"
        assert part["extra"] == {"filename": "c.pdf"} and [r.ref for r in refs] == [part["ref"]]
        assert out[0]["raw"] == "data:application/octet-stream;base64,AQI="
        back = await media.resolve(out, st.blobs, "alice")
        assert back[0]["content"][0] == {"type": "file", "file": pdf, "content_type": "application/pdf",
                                         "filename": "c.pdf"}
        same, refs2 = await media.externalize(msgs, st.blobs, "alice", threshold=10_000)
        assert refs2 == [] and same[0]["content"][0] == msgs[0]["content"][0]

    run(opener, body)


# ------------------------------------------------------------------------------------------------------ blobs


def test_blobs_idempotent_and_per_owner(opener: Opener) -> None:
    async def body(st: Stores) -> None:
        data = os.urandom(5000)
        a = await st.blobs.put("alice", data, "image/png")
        b = await st.blobs.put("alice", data, "image/png")
        assert a == b and a.ref == sha256(data) and a.size == 5000 and a.content_type == "image/png"
        assert await st.blobs.get("alice", a.ref) == data and await st.blobs.info("alice", a.ref) == a
        assert await st.blobs.get("bob", a.ref) is None and await st.blobs.info("bob", a.ref) is None
        assert not await st.blobs.delete("bob", a.ref)
        assert await st.blobs.get("alice", "../../etc/passwd") is None
        assert await st.blobs.delete("alice", a.ref)
        assert await st.blobs.get("alice", a.ref) is None and not await st.blobs.delete("alice", a.ref)
        odd = await st.blobs.put("user/../x:y", b"z")
        assert await st.blobs.get("user/../x:y", odd.ref) == b"z"

    run(opener, body)


# ------------------------------------------------------------------------------------------- opening, env


def test_open_stores_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIMIRAY_HOME", str(tmp_path / "home"))
    st = open_stores()
    assert st.url == "embedded" and (tmp_path / "home" / "stores" / "stores.db").exists()
    asyncio.run(st.close())
    st = open_stores("embedded", home=tmp_path / "h2")
    assert (tmp_path / "h2" / "stores.db").exists()
    asyncio.run(st.close())
    with pytest.raises(StoreError):
        open_stores("sqlite://relative/dir")
    with pytest.raises(StoreError):
        open_stores("mongodb://x")
    monkeypatch.delenv("KIMIRAY_STORES_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert stores_url_from_env() is None
    monkeypatch.setenv("REDIS_URL", "redis://h:1/0")
    assert stores_url_from_env() == "redis://h:1/0"
    monkeypatch.setenv("KIMIRAY_STORES_URL", "sqlite:///d")
    assert stores_url_from_env() == "sqlite:///d"


# ---------------------------------------------------------------------------------------------- Redis only


def test_redis_survives_crash_restart(tmp_path: Path) -> None:
    """SIGKILL with appendfsync always loses nothing acknowledged; the same store objects keep working (the
    client reconnects, scripts are reloaded after NOSCRIPT) and a call made while the server is down
    completes once it is back."""
    require_redis_server()
    with redis_server(tmp_path / "redis") as server:
        async def body() -> None:
            st = open_stores(server.url, key_prefix="crash")
            try:
                queued, _ = await st.tasks.submit("o", sub("q"))
                running, _ = await st.tasks.submit("o", sub("r"))
                lease = await st.tasks.lease("w", lease_s=60, types=["r"])
                assert lease is not None
                s = await st.sessions.create("o", metadata={"k": "v"})
                await st.sessions.append(s.id, "o", [{"role": "user", "content": "hi"}])
                before = {t.id: await st.tasks.get(t.id, "o") for t in (queued, running)}

                server.stop(kill=True)
                server.start()
                after = {t: await st.tasks.get(t, "o") for t in before}
                assert after == before
                assert [m.content for m in await st.sessions.messages(s.id, "o")] == ["hi"]
                assert await st.tasks.renew(lease, 60) == "ok"
                assert await st.tasks.finish(lease, "succeeded", result="done")
                nxt = await st.tasks.lease("w", lease_s=60)
                assert nxt is not None and nxt.task.id == queued.id

                server.stop(kill=True)

                async def restart_soon() -> None:
                    await asyncio.sleep(0.5)
                    await asyncio.to_thread(server.start)

                restarter = asyncio.create_task(restart_soon())
                t0 = time.monotonic()
                evs = await st.tasks.events(running.id)  # issued while the server is down
                await restarter
                assert time.monotonic() - t0 >= 0.4
                assert [e.data["status"] for e in evs] == ["queued", "running", "succeeded"]
                assert await st.tasks.finish(nxt, "succeeded")
                stats = server.info_commandstats()
                assert stats["cmdstat_evalsha"]["calls"] >= 1
            finally:
                await st.close()

        asyncio.run(body())


# --------------------------------------------------------------------------------------------- SQLite only

_LEASER = textwrap.dedent("""
    import asyncio, json, os, sys, time
    from connectors.stores.sqlite import SqliteTaskStore

    async def main(directory, go):
        store = SqliteTaskStore(directory)
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.005)
        got = []
        while True:
            lease = await store.lease(f"pid{os.getpid()}", lease_s=60)
            if lease is None:
                break
            got.append(lease.task.id)
            await asyncio.sleep(0.003)  # "work": without it one process could hold the write lock back to back
        await store.close()
        print(json.dumps(got), flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
""")


def test_sqlite_two_processes_never_lease_the_same_task(tmp_path: Path) -> None:
    directory = tmp_path / "stores"

    async def submit_all() -> set[str]:
        st = open_stores(f"sqlite://{directory}")
        try:
            return {(await st.tasks.submit("o", sub()))[0].id for _ in range(120)}
        finally:
            await st.close()

    ids = asyncio.run(submit_all())
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _LEASER, str(directory), str(go)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        go.touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    leased = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(leased), "both processes should have leased some tasks"
    flat = [t for part in leased for t in part]
    assert len(flat) == len(set(flat)) and set(flat) == ids
