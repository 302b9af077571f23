"""Redis HA with real processes: a primary, one replica and three sentinels (Debian's redis-server), the service
(real ingress app over HTTP + a TaskRunner) on a ``redis+sentinel://`` URL, and the primary lost mid-run.

* ``kill -9`` of the primary while 200 tasks are submitted and session messages written: the sentinels promote
  the replica, the lost machine comes back as a new empty replica (what a rescheduled pod does), every accepted
  task completes exactly once and no accepted session message is lost. Kill -> first acknowledged write is printed.
* SIGSTOP of the primary until the sentinels failed over, then SIGCONT: it rejoins as a replica, and nothing it
  took while isolated was acknowledged (every acknowledged write is on the new primary after the old one's data
  was thrown away by its resync).

"Accepted" is a 2xx for a task (the client retries a 503 or a dropped connection with the same idempotency key)
and a returned ``append`` for a session message (the call the chat session hook makes).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.stores import open_stores
from connectors.stores.base import StoreError
from serve_app.auth import key_id_for
from tests.redis_harness import SentinelCluster, require_redis_server, sentinel_cluster
from tests.task_server import task_server
from tests.test_task_durability import start_worker, stop_worker

pytestmark = pytest.mark.integration

KEY = "k-failover"
OWNER = key_id_for(KEY)
N_TASKS = 200
FAULT_AFTER = 60  # accepted tasks before the primary is lost


async def _submit_all(client: httpx.AsyncClient, accepted: dict[int, str], acks: list[tuple[float, float]],
                      refusals: list[int]) -> None:
    for i in range(N_TASKS):
        body = {"type": "sleepy", "input": {"steps": 2, "step_s": 0.02, "tag": f"t{i}"}, "idempotency_key": f"i{i}"}
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, f"task {i} not accepted within 60 s"
            sent = time.monotonic()
            try:
                r = await client.post("/v1/tasks", json=body)
            except httpx.HTTPError:
                await asyncio.sleep(0.1)
                continue
            if r.status_code in (200, 202):
                accepted[i] = r.json()["id"]
                acks.append((sent, time.monotonic()))
                break
            assert r.status_code == 503, r.text  # anything else is a bug, not an outage
            assert "Retry-After" in r.headers
            refusals.append(r.status_code)
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.005)


async def _write_messages(stores: Any, session_id: str, done: asyncio.Event, accepted: list[str],
                          acks: list[tuple[float, float]]) -> None:
    n = 0
    while not done.is_set():
        n += 1
        text = f"m{n}"  # a new text per attempt: a refused write may still sit on the primary
        sent = time.monotonic()
        try:
            await stores.sessions.append(session_id, OWNER, [{"role": "user", "content": text}])
        except StoreError:
            await asyncio.sleep(0.1)
            continue
        accepted.append(text)
        acks.append((sent, time.monotonic()))
        await asyncio.sleep(0.01)


async def _check_nothing_lost(stores: Any, accepted: dict[int, str], session_id: str, messages: list[str]) -> None:
    deadline = time.monotonic() + 60
    pending = set(accepted.values())
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} accepted tasks not finished within 60 s"
        for task_id in list(pending):
            rec = await stores.tasks.get(task_id, None)
            assert rec is not None, f"accepted task {task_id} lost"
            if rec.status == "succeeded":
                pending.discard(task_id)
            else:
                assert rec.status in ("queued", "running"), rec
        await asyncio.sleep(0.2)
    for task_id in accepted.values():
        ends = [e for e in await stores.tasks.events(task_id)
                if e.type == "status" and e.data.get("status") in ("succeeded", "failed", "cancelled")]
        assert len(ends) == 1, f"task {task_id} ended {len(ends)} times: {ends}"
    stored = [m.content for m in await stores.sessions.messages(session_id, OWNER)]
    missing = [m for m in messages if m not in stored]
    assert not missing, f"{len(missing)} accepted session messages lost, e.g. {missing[:5]}"
    positions = [stored.index(m) for m in messages]
    assert positions == sorted(positions), "accepted session messages out of order"


async def _run(cluster: SentinelCluster, fault: str) -> None:
    app_args = {"auth": {"requests_per_minute": 100_000, "creates_per_minute": 100_000,
                         "max_concurrent_per_key": 1000}}
    tasks_args = {"runner_concurrency": 8, "replica_ack_timeout_s": 1.0}
    with task_server(cluster.url, KEY, tasks_args=tasks_args, app_args=app_args, run_tasks=False) as base:
        # runners as their own processes (kimiray worker), as on a cluster; their writes wait up to lease_s / 2
        workers = [await start_worker(cluster.url, concurrency=4, lease_s=30.0) for _ in range(2)]
        stores = open_stores(cluster.url, replica_ack_timeout_s=1.0)
        session = await stores.sessions.create(OWNER, metadata={"test": fault})
        accepted: dict[int, str] = {}
        messages: list[str] = []
        acks: list[tuple[float, float]] = []  # (sent, acknowledged) of every accepted write
        refusals: list[int] = []
        done = asyncio.Event()
        fault_at: list[float] = []

        async def inject() -> None:
            while len(accepted) < FAULT_AFTER:
                await asyncio.sleep(0.01)
            old_port = cluster.primary_port()
            victim = cluster.server_on(old_port)
            assert victim.proc is not None
            fault_at.append(time.monotonic())
            if fault == "kill":
                victim.proc.kill()
                victim.proc.wait()
                await asyncio.to_thread(cluster.wait_primary_change, old_port)
                await asyncio.to_thread(cluster.replace, victim)  # the lost machine, rescheduled empty
            else:
                victim.proc.send_signal(signal.SIGSTOP)
                try:
                    await asyncio.to_thread(cluster.wait_primary_change, old_port)
                    await asyncio.sleep(0.5)  # clients still talking to it keep waiting on the frozen socket
                finally:
                    victim.proc.send_signal(signal.SIGCONT)
                deadline = time.monotonic() + 30
                while victim.info("replication").get("role") != "slave":  # demoted by the sentinels
                    assert time.monotonic() < deadline, "the old primary did not rejoin as a replica"
                    await asyncio.sleep(0.1)
                await asyncio.to_thread(cluster.wait_replicas, 1)

        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=30) as client:
            writer = asyncio.create_task(_write_messages(stores, session.id, done, messages, acks))
            try:
                await asyncio.wait_for(asyncio.gather(_submit_all(client, accepted, acks, refusals), inject()), 120)
            finally:
                done.set()
                await writer
        assert len(accepted) == N_TASKS
        after = [done for sent, done in acks if sent > fault_at[0]]  # writes sent after the primary was lost
        assert after, "no write was acknowledged after the fault"
        print(f"\n[{fault}] primary lost -> first acknowledged write: {min(after) - fault_at[0]:.2f} s; "
              f"{len(refusals)} submissions answered 503 meanwhile; {len(messages)} session messages accepted")
        try:
            await _check_nothing_lost(stores, accepted, session.id, messages)
        finally:
            for worker in workers:
                await stop_worker(worker)
            await stores.close()


@pytest.fixture
def cluster(tmp_path: Path):
    require_redis_server()
    with sentinel_cluster(tmp_path / "redis") as c:
        yield c


def test_kill_9_of_the_primary_loses_no_accepted_task_or_message(cluster: SentinelCluster) -> None:
    asyncio.run(_run(cluster, "kill"))


def test_frozen_primary_acknowledges_nothing_while_isolated_and_rejoins_as_replica(cluster: SentinelCluster) -> None:
    asyncio.run(_run(cluster, "freeze"))


def test_unconfirmed_writes_are_a_503_with_retry_after_never_a_success(cluster: SentinelCluster) -> None:
    """Two confirmations required, one replica exists: every write times out in WAIT and the client is told so."""
    app_args = {"auth": {"creates_per_minute": 10_000}}
    tasks_args = {"min_replica_acks": 2, "replica_ack_timeout_s": 0.3}
    with task_server(cluster.url, KEY, tasks_args=tasks_args, app_args=app_args, run_tasks=False) as base:
        headers = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(f"{base}/v1/tasks", json={"type": "sleepy", "input": {}, "idempotency_key": "x"},
                       headers=headers, timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "not_replicated" and int(r.headers["Retry-After"]) >= 1
        r = httpx.post(f"{base}/v1/sessions", json={}, headers=headers, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_replicated"


def test_event_waits_longer_than_the_socket_timeout_return_empty_not_an_error(cluster: SentinelCluster) -> None:
    async def main() -> None:
        from connectors.stores.base import TaskSubmission

        stores = open_stores(cluster.url)  # socket_timeout=3 in the harness URL
        try:
            task, _ = await stores.tasks.submit(OWNER, TaskSubmission(type="sleepy"))
            started = time.monotonic()
            assert await stores.tasks.wait_events(task.id, after=1, timeout_s=5) == []
            assert time.monotonic() - started < 5
        finally:
            await stores.close()

    asyncio.run(main())
