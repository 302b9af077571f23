"""The Serve application on a multi-node Ray cluster (all nodes local, on loopback), tiny checkpoint.

Layout: a head node runs the Serve controller, the HTTP proxy (``proxy_location="HeadOnly"``) and the Ingress;
two worker nodes carry the custom resource ``model_node`` that ``ModelServer`` replicas require, so replicas can
only run on workers. The test checks that the two replicas are spread over the two workers, that requests through
the head's proxy succeed, and that after one worker is removed while traffic flows the service recovers: Serve
starts a replacement replica on the surviving worker (which has room for two), new requests succeed again and
the deployment is reported HEALTHY with two running replicas.

Isolation: Ray runs with its own ``RAY_TMPDIR`` so this cluster's address file never redirects another
process's ``ray.init()`` to it; only the processes started here are stopped (``cluster.shutdown()``).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx
import pytest

from tests.serve_harness import SAFE_ENV, free_port, stop_shared_ray

pytestmark = pytest.mark.timeout(300)

KEY = "sk-multinode-test"
APP = "kimiray"
RECOVERY_S = 60.0
STREAK = 10


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None  # None: transport error
    detail: str = ""


def _wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last problem
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def _chat(client: httpx.Client, i: int) -> httpx.Response:
    return client.post("/v1/chat/completions", json={
        "model": "kimi-vl", "messages": [{"role": "user", "content": f"multinode {i}"}],
        "max_tokens": 4, "temperature": 0,
    })


class Traffic:
    """A few threads posting chat requests back to back, recording every outcome."""

    def __init__(self, url: str, workers: int = 3) -> None:
        self.url = url
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(workers)]

    def _run(self, worker: int) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=45) as client:
            i = 0
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    response = _chat(client, worker * 100000 + i)
                    ok = response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in (
                        "stop", "length")
                    outcome = Outcome(started, time.monotonic(), response.status_code if ok else -response.status_code,
                                      "" if ok else response.text[:200])
                except Exception as exc:  # noqa: BLE001 - in-flight requests on a dying node may fail any way
                    outcome = Outcome(started, time.monotonic(), None, repr(exc)[:200])
                with self.lock:
                    self.outcomes.append(outcome)
                i += 1
                if outcome.status != 200:
                    time.sleep(0.05)  # no hot loop while the service is recovering

    def __enter__(self) -> "Traffic":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def snapshot(self) -> list[Outcome]:
        with self.lock:
            return list(self.outcomes)

    def successes(self) -> int:
        return sum(o.status == 200 for o in self.snapshot())

    def streak_since(self, since: float) -> int:
        """Consecutive successes at the end of the record (in completion order), counting only requests that
        started after ``since``."""
        n = 0
        for o in reversed(self.snapshot()):
            if o.status != 200 or o.started < since:
                break
            n += 1
        return n


def _replica_nodes(handle: Any, calls: int = 16) -> list[str]:
    """Node ids reported by ``calls`` concurrent ``ModelServer.node_id`` calls (the router spreads them)."""
    responses = [handle.node_id.remote() for _ in range(calls)]
    return [r.result(timeout_s=30) for r in responses]


def _model_server_state() -> tuple[str, str, dict[str, int]]:
    from ray import serve

    app = serve.status().applications[APP]
    dep = app.deployments["ModelServer"]
    name = lambda value: str(getattr(value, "value", value))  # noqa: E731 - enum or plain string
    return name(app.status), name(dep.status), {name(k): v for k, v in dep.replica_states.items()}


def _model_replicas() -> set[str]:
    """Names of the live ModelServer replica actors (Serve names them ``SERVE_REPLICA::app#deployment#id``)."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#ModelServer#"
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


def _healthy_with_two_running() -> bool:
    app_status, dep_status, replicas = _model_server_state()
    return app_status == "RUNNING" and dep_status == "HEALTHY" and replicas == {"RUNNING": 2}


def test_replicas_on_workers_and_recovery_from_node_loss(tmp_path, monkeypatch) -> None:
    ray_tmp = tempfile.mkdtemp(prefix="kr-mn-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**SAFE_ENV, "KIMIRAY_HOME": str(tmp_path / "home"), "KIMIRAY_API_KEYS": KEY, "RAY_TMPDIR": ray_tmp}
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the nodes started below inherit this environment
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    stop_shared_ray()  # this test's driver connects to a cluster of its own

    import ray
    import ray._private.ray_constants as ray_constants
    from ray import serve
    from ray.cluster_utils import Cluster

    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (SAFE_ENV) keeps the node processes on loopback, but Ray reads it at
    # import: if this process imported ray earlier, ray.init(address="127.0.0.1:…") would rewrite the address to
    # the machine's IP. Apply the same setting here.
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    from connectors.paths import tiny_checkpoint_dir

    tiny_checkpoint_dir()  # write it once here, not racing in replicas

    loopback = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head_node": 1}, **loopback,
    })
    try:
        workers = [cluster.add_node(num_cpus=1, resources={"model_node": 2}, **loopback) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {k: env[k] for k in (*SAFE_ENV, "KIMIRAY_HOME", "KIMIRAY_API_KEYS")}})
        head_id = cluster.head_node.node_id
        worker_ids = {w.node_id for w in workers}
        assert ray.get_runtime_context().get_node_id() == head_id  # the driver must not sit on a node we remove
        assert len(worker_ids) == 2 and head_id not in worker_ids

        from serve_app.app import build_app
        from serve_app.store_guard import PrivateStoreOnCluster

        monkeypatch.delenv("KIMIRAY_STORES_URL", raising=False)
        monkeypatch.delenv("REDIS_URL", raising=False)
        with pytest.raises(PrivateStoreOnCluster, match="3 nodes"):  # per-node SQLite on a cluster: refused
            build_app({})

        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        from serve_app.app import Ingress, ModelServer
        from serve_app.config import AppConfig

        config = AppConfig.model_validate({
            "request_timeout_s": 30,
            "model": {"engine": {"cache_tokens": 4096, "cpu_cache_tokens": 4096, "max_waiting": 64}},
            "auth": {"requests_per_minute": 1_000_000, "max_concurrent_per_key": 64},
            # all nodes share this machine's disk: name the directory, or the store guard refuses a cluster
            "tasks": {"stores_url": f"sqlite://{tmp_path / 'home' / 'stores'}"},
        }).model_dump()
        model = ModelServer.options(
            num_replicas=2, max_ongoing_requests=16,
            ray_actor_options={"num_cpus": 0.5, "resources": {"model_node": 1}},
        ).bind(config)
        ingress = Ingress.options(ray_actor_options={"num_cpus": 0.1, "resources": {"head_node": 0.1}})
        serve.run(ingress.bind(model, config), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        handle = serve.get_deployment_handle("ModelServer", app_name=APP)

        # (a) one replica on each worker, none on the head
        seen: set[str] = set()

        def both_workers() -> bool:
            seen.update(_replica_nodes(handle))
            return len(seen) == 2

        _wait_for("replicas on both workers", both_workers, timeout=30)
        assert seen == worker_ids, (seen, worker_ids)
        original = _model_replicas()
        assert len(original) == 2, original

        # (b) requests through the head's HTTP proxy
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            assert client.get("/readyz").status_code == 200
            for i in range(4):
                response = _chat(client, i)
                assert response.status_code == 200, response.text
                body = response.json()
                assert body["choices"][0]["finish_reason"] in ("stop", "length")
                assert body["usage"]["completion_tokens"] >= 1

        # (c) lose a worker while traffic flows
        victim, survivor = workers[0], workers[1]
        with Traffic(url) as traffic:
            _wait_for("traffic before the node loss", lambda: traffic.successes() >= 6, timeout=60)
            before = traffic.snapshot()
            assert all(o.status == 200 for o in before), [o.detail for o in before if o.status != 200]

            killed_at = time.monotonic()
            cluster.remove_node(victim)

            states: list[tuple[float, tuple[str, str, dict[str, int]]]] = []

            def recovered() -> bool:
                state = _model_server_state()
                if not states or states[-1][1] != state:
                    states.append((time.monotonic() - killed_at, state))
                replicas = _model_replicas()
                # the lost replica is gone and a new one replaced it (so the controller has seen the loss)
                replaced = len(replicas) == 2 and len(replicas & original) == 1
                if not replaced or traffic.streak_since(killed_at) < STREAK or not _healthy_with_two_running():
                    return False
                return set(_replica_nodes(handle)) == {survivor.node_id}

            _wait_for(f"{STREAK} consecutive successes and ModelServer HEALTHY with a replacement replica",
                      recovered, timeout=RECOVERY_S, interval=0.5)
            recovered_at = time.monotonic()
        in_flight = [o for o in traffic.snapshot() if o.started < killed_at <= o.ended]
        after = [o for o in traffic.snapshot() if o.started >= killed_at]
        failed = [o for o in after if o.status != 200]
        print(f"node loss: recovered in {recovered_at - killed_at:.1f}s; in flight at the loss: {len(in_flight)}, "
              f"{sum(o.status != 200 for o in in_flight)} failed; started after it: {len(after)}, "
              f"{len(failed)} failed: {sorted({o.detail[:80] for o in failed})}; "
              f"ModelServer states seen: {[(round(t, 1), st) for t, st in states]}")
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert victim.node_id not in alive and survivor.node_id in alive

        # after recovery every new request succeeds, and both replicas live on the surviving worker
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            for i in range(STREAK):
                response = _chat(client, 1000 + i)
                assert response.status_code == 200, response.text
        app_status, dep_status, replicas = _model_server_state()
        assert (app_status, dep_status) == ("RUNNING", "HEALTHY")
        assert replicas == {"RUNNING": 2}, replicas
        assert set(_replica_nodes(handle, calls=24)) == {survivor.node_id}
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
