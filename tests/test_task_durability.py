"""Nothing accepted is lost: runner processes killed with SIGKILL, redis-server killed and restarted (AOF), and a
chunked job interrupted half-way - all against a real redis-server and real worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


from connectors.stores import open_stores
from connectors.stores.base import TaskSubmission
from tests.redis_harness import redis_server

REPO = Path(__file__).resolve().parents[1]
OWNER = "key-durability"


async def start_worker(url: str, *, concurrency: int = 4, lease_s: float = 2.0,
                       home: Path | None = None) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    if home is not None:
        env["KIMIRAY_HOME"] = str(home)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agents.worker", "--stores", url, "--agent-module", "tests.agents_for_tests",
        "--model", "none", "--concurrency", str(concurrency), "--lease-s", str(lease_s),
        cwd=str(REPO), env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)


async def stop_worker(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


async def wait_until(predicate, timeout: float, what: str, period: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(period)


async def statuses(stores: Any, ids: list[str]) -> dict[str, Any]:
    return {i: await stores.tasks.get(i, None) for i in ids}


def test_sigkill_of_a_runner_during_20_tasks_loses_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as redis:
            stores = open_stores(redis.url)
            ids = []
            for i in range(20):
                record, _ = await stores.tasks.submit(OWNER, TaskSubmission(
                    type="sleepy", input={"steps": 8, "step_s": 0.1, "tag": f"t{i}"}), max_attempts=3)
                ids.append(record.id)
            doomed = await start_worker(redis.url)
            survivor = None
            try:
                async def doomed_busy() -> list[str]:
                    recs = await statuses(stores, ids)
                    return [i for i, r in recs.items()
                            if r.status == "running" and r.lease_worker and f":{doomed.pid}:" in r.lease_worker]

                victims = await wait_until(doomed_busy, 60, "the first worker to run tasks")
                survivor = await start_worker(redis.url)
                doomed.kill()  # SIGKILL: no release, no goodbye
                await doomed.wait()

                async def all_done() -> bool:
                    recs = await statuses(stores, ids)
                    return all(r.status in ("succeeded", "failed", "cancelled") for r in recs.values())

                await wait_until(all_done, 120, "all 20 tasks to end", period=0.25)
                final = await statuses(stores, ids)
                assert all(r.status == "succeeded" for r in final.values()), {
                    i: (r.status, r.error) for i, r in final.items() if r.status != "succeeded"}
                for task_id, record in final.items():
                    events = await stores.tasks.events(task_id)
                    ends = [e for e in events if e.type == "status" and e.data.get("status") == "succeeded"]
                    assert len(ends) == 1, f"{task_id}: result written {len(ends)} times"
                    assert record.result["tag"] == record.input["tag"]
                    assert record.result["attempt"] == record.attempts
                for task_id in victims:  # the killed worker's tasks ran again elsewhere
                    assert final[task_id].attempts >= 2
            finally:
                for proc in (doomed, survivor):
                    if proc is not None:
                        await stop_worker(proc)
                await stores.close()

    asyncio.run(main())


def test_redis_restart_with_tasks_queued_and_running_loses_none_nor_sessions(tmp_path: Path) -> None:
    async def main() -> None:
        with redis_server(tmp_path / "redis") as redis:
            stores = open_stores(redis.url)
            ids = []
            for i in range(10):
                record, _ = await stores.tasks.submit(OWNER, TaskSubmission(
                    type="sleepy", input={"steps": 10, "step_s": 0.1, "tag": f"r{i}"}), max_attempts=5)
                ids.append(record.id)
            session = await stores.sessions.create(OWNER, metadata={"purpose": "restart check"})
            turns = [{"role": "user", "content": f"turn {i}"} for i in range(5)]
            await stores.sessions.append(session.id, OWNER, turns, token_count=25)
            await stores.sessions.set_partial(session.id, OWNER, "chunk-0", {"done": True})
            worker = await start_worker(redis.url, concurrency=2, lease_s=5.0)
            try:
                async def two_running() -> bool:
                    recs = await statuses(stores, ids)
                    return sum(r.status == "running" for r in recs.values()) == 2

                await wait_until(two_running, 60, "two running tasks")
                before = {i: r.status for i, r in (await statuses(stores, ids)).items()}
                assert sorted(before.values()).count("queued") >= 7
                redis.stop(kill=True)  # SIGKILL; appendfsync always
                await asyncio.sleep(1.0)
                redis.start()
                after = await statuses(stores, ids)  # the same store object reconnects by itself
                assert all(after[i] is not None for i in ids)
                kept = await stores.sessions.get(session.id, OWNER)  # sessions survive the restart too
                assert kept is not None and kept.metadata == {"purpose": "restart check"}
                assert [m.content for m in await stores.sessions.messages(session.id, OWNER)] == \
                    [t["content"] for t in turns]
                assert await stores.sessions.partials(session.id, OWNER) == {"chunk-0": {"done": True}}
                for i in ids:
                    if before[i] == "queued":
                        assert after[i].status in ("queued", "running", "succeeded")

                async def all_succeeded() -> bool:
                    recs = await statuses(stores, ids)
                    return all(r.status == "succeeded" for r in recs.values())

                await wait_until(all_succeeded, 120, "all 10 tasks to succeed after the restart", period=0.25)
            finally:
                await stop_worker(worker)
                await stores.close()

    asyncio.run(main())


def test_chunked_job_interrupted_half_way_resumes_without_redoing_chunks(tmp_path: Path,
                                                                          tiny_checkpoint: Path) -> None:
    home = tmp_path / "home"
    (home).mkdir()
    os.symlink(tiny_checkpoint, home / "tiny-kimi-vl")  # the agent's tokenizer: no need to write it again

    async def main() -> None:
        with redis_server(tmp_path / "redis") as redis:
            stores = open_stores(redis.url)
            record, _ = await stores.tasks.submit(OWNER, TaskSubmission(
                type="chunked_count", input={"words": 6000, "chunk_tokens": 400, "map_delay_s": 0.25}))
            first = await start_worker(redis.url, lease_s=2.0, home=home)
            second = None
            try:
                async def computed_indices() -> list[int]:
                    return [e.data["index"] for e in await stores.tasks.events(record.id)
                            if e.type == "chunk_computed"]

                await wait_until(lambda: _at_least(computed_indices, 5), 90, "5 chunks computed")
                first.kill()
                await first.wait()
                before_kill = await computed_indices()
                second = await start_worker(redis.url, lease_s=2.0, home=home)

                async def done() -> Any:
                    r = await stores.tasks.get(record.id, None)
                    return r if r.status in ("succeeded", "failed") else None

                final = await wait_until(done, 120, "the chunked task to finish", period=0.25)
                assert final.status == "succeeded", final.error
                assert final.attempts == 2
                result = final.result
                total = result["chunks"]
                assert total >= 10 and result["reused"] + result["computed"] == total
                assert result["reused"] >= len(before_kill) - 1  # at most the chunk in flight is redone
                indices = await computed_indices()
                redone = [i for i in set(indices) if indices.count(i) > 1]
                assert len(redone) <= 1 and sorted(set(indices)) == list(range(total))
            finally:
                for proc in (first, second):
                    if proc is not None:
                        await stop_worker(proc)
                await stores.close()

    asyncio.run(main())


async def _at_least(fn, n: int) -> bool:
    return len(await fn()) >= n
