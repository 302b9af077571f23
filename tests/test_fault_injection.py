"""kill -9 during a run of 50 tasks on the real Serve application (local Ray, tiny checkpoint): one TaskRunner
replica and one ModelServer replica die mid-run, and still all 50 tasks succeed, each exactly once.

"Exactly once" is checked where it can be seen: one ``succeeded`` status event per task, and the chat agent's one
side effect - the turn it appends to the task's session - is there once (2 messages, not 4).

Layout: 2 ModelServer replicas, 2 TaskRunner replicas (lease 3 s), the embedded SQLite store under
``KIMIRAY_HOME`` (the test reads it directly to find which runner process holds running tasks). The replica
processes are found through their named Serve actors (``__ray_call__`` returns ``os.getpid()``) and killed with
SIGKILL - no graceful shutdown, no lease handed back. The Redis restart and the loss of a worker node are covered
by tests/test_task_durability.py and tests/test_serve_multinode.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from tests.serve_harness import running_service

pytestmark = pytest.mark.timeout(240)

KEY = "sk-fault-0001"
H = {"Authorization": f"Bearer {KEY}"}
TASKS = 50


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("home")
    args = {
        "request_timeout_s": 60,
        "model": {"engine": {"cache_tokens": 16384, "max_waiting": 64}},
        "auth": {"requests_per_minute": 100000, "max_concurrent_per_key": 64},
        "tasks": {"agent_modules": ["tests.agents_for_tests"], "lease_s": 3.0, "runner_concurrency": 6},
    }
    options = {"ModelServer": {"num_replicas": 2, "max_ongoing_requests": 32},
               "TaskRunner": {"num_replicas": 2}}
    # a Ray of its own: this module kills replica processes with SIGKILL
    with running_service(home, KEY, args, options, with_runner=True, shared=False) as url:
        yield url, home


def _wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _replica_pids(deployment: str) -> dict[str, int]:
    """{replica actor name: its process id} for the live replicas of ``deployment``."""
    import ray

    pids = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if f"#{deployment}#" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
            try:
                pids[actor["name"]] = ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
            except Exception:  # noqa: BLE001 - a replica that is going away
                continue
    return pids


def _busiest(replicas: dict[str, int]) -> tuple[int, int] | None:
    """(pid, ongoing requests) of the replica with the most requests in flight, if any has one."""
    import ray

    best = None
    for name, pid in replicas.items():
        try:
            ongoing = ray.get(ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a replica that is going away
            continue
        if ongoing >= 1 and (best is None or ongoing > best[1]):
            best = (pid, ongoing)
    return best


def _statuses(url: str) -> dict[str, dict[str, Any]]:
    page = httpx.get(f"{url}/v1/tasks", params={"limit": 500, "type": "chat"}, headers=H, timeout=30)
    return {t["id"]: t for t in page.json()["data"]}


def _store_view(home: Path, ids: list[str]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Task records (with the internal lease fields) and event lists, read straight from the SQLite store."""
    from connectors.stores import open_stores

    async def read() -> tuple[dict[str, Any], dict[str, list[Any]]]:
        stores = open_stores(f"sqlite://{home / 'stores'}")
        try:
            records = {i: await stores.tasks.get(i, None) for i in ids}
            events = {i: await stores.tasks.events(i) for i in ids}
            return records, events
        finally:
            await stores.close()

    return asyncio.run(read())


class FlakyBackend:
    """Fails ``failures`` times as a dead or overloaded replica would, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    async def complete(self, request: Any) -> list[Any]:
        from engine.runtime.engine import EngineOverloadedError
        from engine.runtime.request import Delta

        self.calls += 1
        if self.calls <= self.failures:
            raise EngineOverloadedError("replica restarting")
        return [Delta(request_id="r", text="ok", finish_reason="stop")]


def test_the_model_client_resends_a_request_while_the_model_is_unavailable() -> None:
    from connectors.model_client import BackendModelClient, ModelUnavailableError
    from engine.runtime.request import GenerateRequest

    request = GenerateRequest(prompt_token_ids=[1, 2], max_tokens=1)
    backend = FlakyBackend(failures=3)
    reply = asyncio.run(BackendModelClient(backend, retry_s=5, backoff_s=(0.01, 0.02)).generate(request))
    assert reply.text == "ok" and backend.calls == 4  # no attempt of the task is spent on the outage
    down = FlakyBackend(failures=10**6)
    with pytest.raises(ModelUnavailableError):  # a lasting outage reaches the runner, which re-queues the task
        asyncio.run(BackendModelClient(down, retry_s=0.2, backoff_s=(0.01, 0.05)).generate(request))
    assert down.calls >= 3


def test_kill_9_of_a_runner_and_a_model_replica_during_50_tasks(service: tuple[str, Path]) -> None:
    url, home = service
    runners, models = _replica_pids("TaskRunner"), _replica_pids("ModelServer")
    assert len(runners) == 2 and len(models) == 2, (runners, models)

    ids = []
    for i in range(TASKS):
        r = httpx.post(f"{url}/v1/tasks", headers=H, timeout=30, json={"type": "chat", "input": {
            "messages": [{"role": "user", "content": f"fault injection turn {i}"}], "max_tokens": 400}})
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])

    # kill -9 a runner that holds running tasks, then a model replica while tasks are generating
    def running_on() -> dict[int, list[str]]:
        records, _ = _store_view(home, ids)
        by_pid: dict[int, list[str]] = {}
        for rec in records.values():
            if rec.status == "running" and rec.lease_worker:
                by_pid.setdefault(int(rec.lease_worker.split(":")[1]), []).append(rec.id)
        return {pid: tasks for pid, tasks in by_pid.items() if pid in runners.values()}

    busy = _wait_for("tasks running on a runner replica", running_on, timeout=90, interval=0.25)
    victim_runner, in_flight = max(busy.items(), key=lambda kv: len(kv[1]))
    os.kill(victim_runner, signal.SIGKILL)
    victim_model, ongoing = _wait_for("a model replica with requests in flight", lambda: _busiest(models), timeout=60,
                                      interval=0.05)
    os.kill(victim_model, signal.SIGKILL)
    killed_at = time.monotonic()

    # every task ends, and ends well
    final = _wait_for("all tasks to end",
                      lambda: (s := _statuses(url)) and all(s[i]["status"] in ("succeeded", "failed", "cancelled")
                                                            for i in ids) and s, timeout=180, interval=0.5)
    failed = {i: final[i]["error"] for i in ids if final[i]["status"] != "succeeded"}
    assert not failed, failed
    records, events = _store_view(home, ids)
    for task_id in ids:
        ends = [e for e in events[task_id] if e.type == "status" and e.data.get("status") == "succeeded"]
        assert len(ends) == 1, (task_id, [e.model_dump() for e in events[task_id]])
    assert any(records[i].attempts >= 2 for i in in_flight), "the killed runner's tasks were not re-run"

    # the agent's side effect happened once per task: its session holds one user turn and one reply
    for task_id in ids:
        session_id = final[task_id]["session_id"]
        messages = httpx.get(f"{url}/v1/sessions/{session_id}/messages", headers=H, timeout=30).json()["data"]
        assert [m["role"] for m in messages] == ["user", "assistant"], (task_id, messages)

    # and Serve replaced both replicas
    def healthy() -> bool:
        from ray import serve

        deployments = serve.status().applications["kimiray"].deployments
        return all(deployments[name].status == "HEALTHY" and deployments[name].replica_states.get("RUNNING") == 2
                   for name in ("TaskRunner", "ModelServer"))

    _wait_for("both deployments back to 2 healthy replicas", healthy, timeout=120, interval=0.5)
    after_runners, after_models = _replica_pids("TaskRunner"), _replica_pids("ModelServer")
    assert victim_runner not in after_runners.values() and victim_model not in after_models.values()
    attempts = Counter(records[i].attempts for i in ids)
    print(f"killed runner {victim_runner} ({len(in_flight)} tasks running) and model replica {victim_model} "
          f"({ongoing} requests in flight); attempts per task: {dict(attempts)}; all ended "
          f"{time.monotonic() - killed_at:.1f}s after the kills")

