"""Ray head fault tolerance on one machine: a local head whose GCS keeps its state in an external Redis on loopback
behind Sentinel (``RAY_REDIS_ADDRESS`` names a sentinel; the GCS asks it for the primary), the kimiray Serve app
(tiny checkpoint) with a TaskRunner on the same Sentinel (``redis+sentinel://``), and the GCS server killed by PID. While it is down, chat requests keep being answered and accepted tasks keep
progressing (data path: proxy -> replicas and runners -> Redis, no GCS); after it restarts (re-reading its state
from Redis) the cluster answers control-plane calls again and new tasks run.

What this cannot show on one machine: the head *pod* being replaced on another node (KubeRay restarts it with
the same Redis; deploy/kuberay-rayservice.yaml), and a Redis failover while the GCS is down (the store side of a
failover is tests/test_sentinel_failover.py).
"""

from __future__ import annotations

import tempfile
import time

import httpx
import pytest

from tests.redis_harness import sentinel_cluster
from tests.serve_harness import REPO, SAFE_ENV, free_port, stop_shared_ray

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KEY = "sk-gcs-ft"


def _chat(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/chat/completions", json={
        "model": "kimi-vl", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0})


def _task_progress(client: httpx.Client, ids: list[str]) -> dict[str, tuple[str, float]]:
    out = {}
    for task_id in ids:
        body = client.get(f"/v1/tasks/{task_id}").json()
        out[task_id] = (body["status"], (body.get("progress") or {}).get("done", 0))
    return out


def test_serve_keeps_answering_and_tasks_progress_while_the_gcs_is_down(tmp_path, monkeypatch) -> None:
    with sentinel_cluster(tmp_path / "redis") as redis:
        ray_tmp = tempfile.mkdtemp(prefix="kr-gcs-", dir="/tmp")
        env = {**SAFE_ENV, "KIMIRAY_HOME": str(tmp_path / "home"), "KIMIRAY_API_KEYS": KEY, "RAY_TMPDIR": ray_tmp,
               "RAY_REDIS_ADDRESS": f"127.0.0.1:{redis.sentinel_ports[0]}",  # a sentinel: the GCS finds the primary
               "RAY_external_storage_namespace": "kr-gcs-test",
               "PYTHONPATH": REPO}  # replicas import tests.agents_for_tests
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        stop_shared_ray()

        import ray
        import ray._private.ray_constants as ray_constants
        from ray import serve
        from ray.cluster_utils import Cluster

        monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        from connectors.paths import tiny_checkpoint_dir

        tiny_checkpoint_dir()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 4, "node_ip_address": "127.0.0.1", "include_dashboard": False})
        try:
            ray.init(address=cluster.address, _node_ip_address="127.0.0.1",
                     runtime_env={"env_vars": {k: env[k] for k in (*SAFE_ENV, "KIMIRAY_HOME", "KIMIRAY_API_KEYS",
                                                                   "PYTHONPATH")}})
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            from serve_app.app import Ingress, ModelServer, TaskRunnerDeployment
            from serve_app.config import AppConfig

            config = AppConfig.model_validate({
                "request_timeout_s": 30,
                "model": {"engine": {"cache_tokens": 4096, "cpu_cache_tokens": 4096, "max_waiting": 64}},
                "tasks": {"stores_url": redis.url, "agent_modules": ["tests.agents_for_tests"], "lease_s": 10,
                          "runner_concurrency": 4},
            }).model_dump()
            model = ModelServer.options(ray_actor_options={"num_cpus": 1}).bind(config)
            runner = TaskRunnerDeployment.options(ray_actor_options={"num_cpus": 0.5}).bind(model, config)
            serve.run(Ingress.bind(model, config, runner), name="kimiray", route_prefix="/")

            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"},
                              timeout=60) as client:
                assert _chat(client).status_code == 200
                ids = [client.post("/v1/tasks", json={"type": "sleepy", "input": {"steps": 40, "step_s": 0.25}})
                       .json()["id"] for _ in range(3)]
                deadline = time.monotonic() + 60
                while not all(st == "running" and done > 0 for st, done in _task_progress(client, ids).values()):
                    assert time.monotonic() < deadline, _task_progress(client, ids)
                    time.sleep(0.2)

                cluster.head_node.kill_gcs_server()  # by its PID (SIGKILL)
                down_at = time.monotonic()
                before = _task_progress(client, ids)
                chats = []
                while time.monotonic() - down_at < 6:
                    chats.append(_chat(client).status_code)
                    time.sleep(0.3)
                during = _task_progress(client, ids)
                print(f"\nGCS down {time.monotonic() - down_at:.1f} s: chat statuses {chats}; task progress "
                      f"{[before[i][1] for i in ids]} -> {[during[i][1] for i in ids]}")
                assert chats and all(code == 200 for code in chats), chats
                assert any(during[i][1] > before[i][1] or during[i][0] == "succeeded" for i in ids)

                cluster.head_node.start_gcs_server()
                deadline = time.monotonic() + 90
                while True:  # control plane back: the driver's calls succeed again
                    try:
                        if serve.status().applications["kimiray"].status == "RUNNING":
                            break
                    except Exception:  # noqa: BLE001 - still reconnecting
                        pass
                    assert time.monotonic() < deadline, "the cluster did not recover after the GCS restart"
                    time.sleep(0.5)
                print(f"GCS restarted: control plane back {time.monotonic() - down_at:.1f} s after the kill")
                assert _chat(client).status_code == 200
                new = client.post("/v1/tasks", json={"type": "sleepy", "input": {"steps": 2, "step_s": 0.05}})
                deadline = time.monotonic() + 60
                while client.get(f"/v1/tasks/{new.json()['id']}").json()["status"] != "succeeded":
                    assert time.monotonic() < deadline, "a task submitted after the restart did not run"
                    time.sleep(0.2)
                deadline = time.monotonic() + 60
                while not all(st == "succeeded" for st, _ in _task_progress(client, ids).values()):
                    assert time.monotonic() < deadline, _task_progress(client, ids)
                    time.sleep(0.3)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                cluster.shutdown()
