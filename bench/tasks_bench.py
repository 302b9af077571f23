"""Task layer throughput on one machine: tasks accepted per second (REST and SDK), tasks completed per second by
a runner, event throughput (written, and delivered over SSE), and Redis commands per task.

Setup per store (``--stores redis sqlite``): the real ingress app served by uvicorn in a thread of this process
(``tests/task_server.py``: no Ray, no model - the agents here use none), its TaskRunner loop in the same event
loop, and a real ``redis-server`` (AOF on, ``appendfsync everysec`` unless ``--fsync always``) or the embedded
SQLite store on local disk. Load comes from this process.

  submit_rest   POST /v1/tasks with one keep-alive httpx client, sequential, then ``--concurrency`` client
                processes at once (their POSTs overlap; the rate counts from the first start to the last end)
  submit_sdk    kimiray.Client.submit (auto idempotency key), sequential
  complete      ``--tasks`` one-step tasks submitted at once; time until the runner has finished them all
  events        one task emitting ``--events`` progress events as fast as it can: events/s written; then the
                whole stream read back over SSE: events/s delivered
  redis_cmds    INFO commandstats delta over the ``complete`` phase / tasks (submit + lease + session + progress
                + finish, heartbeats included), and per event over the ``events`` phase

Usage: python bench/tasks_bench.py [--stores redis sqlite] [--tasks 300] [--events 2000] [--concurrency 2]
       [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = "sk-bench-tasks-0001"
H = {"Authorization": f"Bearer {KEY}"}


def _wait_all(client: Any, url: str, ids: list[str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending:
        page = client.get(f"{url}/v1/tasks", params={"status": "succeeded", "limit": 500}, headers=H).json()
        # cheap check: count finished via the list endpoint, then confirm the stragglers one by one
        pending -= {t["id"] for t in page["data"]}
        if pending and len(pending) < 50:
            pending = {i for i in pending if client.get(f"{url}/v1/tasks/{i}", headers=H).json()["status"]
                       not in ("succeeded", "failed", "cancelled")}
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} tasks unfinished")
        time.sleep(0.05)


def _post_many(job: tuple[str, dict[str, Any], int]) -> tuple[float, float]:
    """One load process: ``count`` sequential POSTs on one keep-alive connection; returns (start, end)."""
    import httpx

    url, body, count = job
    with httpx.Client(timeout=60) as client:
        client.post(f"{url}/v1/tasks", json=body, headers=H)  # connect before the clock starts
        started = time.time()
        for _ in range(count):
            assert client.post(f"{url}/v1/tasks", json=body, headers=H).status_code == 202
        return started, time.time()


def _redis_calls(redis: Any) -> int:
    if redis is None:
        return 0
    return int(sum(v["calls"] for v in redis.info_commandstats().values()))


def bench_store(kind: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import httpx

    import kimiray
    from tests.task_server import task_server

    redis = None
    if kind == "redis":
        from tests.redis_harness import RedisServer

        redis = RedisServer(workdir / "redis", appendfsync=args.fsync)
        redis.start()
        url_store = redis.url
    else:
        url_store = f"sqlite:///{workdir / 'sqlite'}"
    out: dict[str, Any] = {"store": kind}
    try:
        with task_server(url_store, KEY, lease_s=30.0, run_tasks=False) as url, httpx.Client(timeout=60) as client:
            body = {"type": "sleepy", "input": {"steps": 1, "step_s": 0}}
            for _ in range(20):  # warm-up
                client.post(f"{url}/v1/tasks", json=body, headers=H)
            n = args.tasks
            started = time.perf_counter()
            for _ in range(n):
                r = client.post(f"{url}/v1/tasks", json=body, headers=H)
                assert r.status_code == 202, r.text
            out["submit_rest_seq_per_s"] = n / (time.perf_counter() - started)

            # concurrent clients in their own processes (threads here would fight the server for the GIL)
            per = n // args.concurrency
            with ProcessPoolExecutor(args.concurrency, mp_context=multiprocessing.get_context("spawn")) as pool:
                spans = list(pool.map(_post_many, [(url, body, per)] * args.concurrency))
            out[f"submit_rest_c{args.concurrency}_per_s"] = per * args.concurrency / (
                max(e for _, e in spans) - min(s for s, _ in spans))

            with kimiray.Client(url, api_key=KEY) as sdk:
                started = time.perf_counter()
                for _ in range(n):
                    sdk.submit("sleepy", {"steps": 1, "step_s": 0})
                out["submit_sdk_seq_per_s"] = n / (time.perf_counter() - started)

        # completion throughput and events: a fresh server with a runner (earlier tasks would be run too, so use
        # a fresh store namespace: a new SQLite dir, or FLUSHDB)
        if redis is not None:
            import socket

            with socket.create_connection(("127.0.0.1", redis.port)) as s:
                s.sendall(b"FLUSHDB\r\n")
                s.recv(100)
        else:
            url_store = f"sqlite:///{workdir / 'sqlite2'}"
        with task_server(url_store, KEY, lease_s=30.0, tasks_args={"runner_concurrency": 8}) as url, \
                httpx.Client(timeout=60) as client:
            n = args.tasks
            calls0 = _redis_calls(redis)
            started = time.perf_counter()
            ids = [client.post(f"{url}/v1/tasks", json={"type": "sleepy", "input": {"steps": 1, "step_s": 0}},
                               headers=H).json()["id"] for _ in range(n)]
            _wait_all(client, url, ids)
            elapsed = time.perf_counter() - started
            calls1 = _redis_calls(redis)
            out["complete_tasks_per_s"] = n / elapsed
            if redis is not None:
                # the wait loop's own reads are included; subtract them by measuring an idle poll
                out["redis_cmds_per_task_incl_polling"] = (calls1 - calls0) / n

            task = client.post(f"{url}/v1/tasks", json={"type": "sleepy", "input": {
                "steps": args.events // 2, "step_s": 0}}, headers=H).json()  # a step and a progress event per step
            calls0 = _redis_calls(redis)
            started = time.perf_counter()
            while client.get(f"{url}/v1/tasks/{task['id']}", headers=H).json()["status"] != "succeeded":
                time.sleep(0.01)
            written = time.perf_counter() - started
            calls1 = _redis_calls(redis)
            count = client.get(f"{url}/v1/tasks/{task['id']}", headers=H).json()["last_event_id"]
            out["events_written"] = count
            out["events_written_per_s"] = count / written
            if redis is not None:
                out["redis_cmds_per_event"] = (calls1 - calls0) / count
            started = time.perf_counter()
            received = 0
            with client.stream("GET", f"{url}/v1/tasks/{task['id']}/events", headers=H) as r:
                for line in r.iter_lines():
                    if line.startswith("id: "):
                        received += 1
            out["sse_events_delivered_per_s"] = received / (time.perf_counter() - started)
            assert received == count, (received, count)

            if redis is not None:  # commands of one task's whole life, measured alone (no polling)
                # (server-side commands: a Lua script counts as EVALSHA plus every command it runs)
                calls0 = _redis_calls(redis)
                one = client.post(f"{url}/v1/tasks", json={"type": "sleepy", "input": {"steps": 1, "step_s": 0}},
                                  headers=H).json()
                time.sleep(1.0)
                calls_mid = _redis_calls(redis)
                idle0 = _redis_calls(redis)
                time.sleep(1.0)
                idle = _redis_calls(redis) - idle0  # the idle runner's lease polling per second
                out["redis_cmds_one_task"] = (calls_mid - calls0) - idle - 2  # minus our 2 INFO calls
                out["redis_cmds_idle_runner_per_s"] = idle - 1
                assert client.get(f"{url}/v1/tasks/{one['id']}", headers=H).json()["status"] == "succeeded"
    finally:
        if redis is not None:
            redis.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stores", nargs="+", default=["redis", "sqlite"], choices=["redis", "sqlite"])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--fsync", default="everysec", choices=["everysec", "always"])
    parser.add_argument("--json")
    args = parser.parse_args()
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "NO_PROXY": "127.0.0.1,localhost"}.items():
        os.environ.setdefault(key, value)
    import logging

    logging.getLogger("kimiray").setLevel(logging.ERROR)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.stores:
            result = bench_store(kind, args, Path(tmp) / kind)
            print(json.dumps(result, indent=1), flush=True)
            results.append(result)
    report = {"machine": f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}",
              "args": vars(args), "results": results, "threads": threading.active_count()}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
