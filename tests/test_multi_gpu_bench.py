"""bench/multi_gpu_bench.py end to end on CPU: the one-host config deployed on a local Ray with 2 fake GPUs (one
per ModelServer replica), simulated replicas for the load phases and the tiny checkpoint for session affinity.

One short run of every phase, judged on what the bench is for: both replica counts serve without errors; a
session's follow-up turns hit its replica's prefix cache when routed; after a replica's process is SIGKILLed
under load every in-flight stream either finished or ended with a JSON error (never a silently broken stream),
every later failure is a clear error too, the replacement comes up and the accepted tasks all succeed; the
autoscaler adds the second replica under the load step and removes it after. A second test starts
deploy/ray_config.gpu-cluster.yaml on 2 fake GPUs with a real redis-server behind its stores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve_harness import SAFE_ENV, stop_shared_ray

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]
REPO = Path(__file__).resolve().parents[1]


def test_every_phase_on_two_fake_gpus(tmp_path: Path) -> None:
    stop_shared_ray()  # the bench starts a Ray of its own (in its own process)
    out = tmp_path / "multi_gpu.json"
    command = [sys.executable, "bench/multi_gpu_bench.py", "--fake-gpus", "2", "--replicas", "1", "2",
               # the simulated phases first (each redeploy only changes the replica count), the tiny model last
               "--phases", "scaling", "failover", "autoscale", "affinity",
               "--model", "sim:h100-slow10", "--affinity-model", "tiny", "--phase-s", "3", "--warmup-s", "1",
               "--concurrency-per-replica", "3", "--max-tokens", "12", "--sessions", "3", "--turns", "2",
               "--doc-chars", "800", "--tasks", "3", "--failover-before-s", "2", "--failover-settle-s", "1",
               "--upscale-delay-s", "1", "--downscale-delay-s", "3", "--metrics-interval-s", "0.5",
               "--look-back-period-s", "2", "--target-ongoing-requests", "1.5", "--autoscale-low-s", "1",
               "--autoscale-hold-s", "1", "--autoscale-timeout-s", "90", "--json", str(out)]
    env = {**os.environ, **SAFE_ENV, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert report["simulated"] and report["gpus"] == {"count": 2, "fake": True, "per_replica": 1.0}
    assert not [name for name, phase in phases.items() if "error" in phase], phases

    steps = phases["scaling"]["steps"]
    assert [s["replicas"] for s in steps] == [1, 2]
    for step in steps:
        assert step["ok"] > 0 and step["errors"] == {}, step
        assert step["ttft_p50_s"] and step["tpot_p50_s"]
    assert steps[1]["efficiency_requests"] > 0

    affinity = phases["affinity"]
    assert affinity["model"] == "tiny"
    assert affinity["routed"]["errors"] == {} and affinity["routed"]["follow_up_hit_rate"] >= 0.8

    failover = phases["failover"]
    in_flight = failover["in_flight_at_kill"]
    assert in_flight["streams"] > 0 and in_flight["unclear"] == 0, in_flight
    after = failover["started_after_kill"]
    assert after["ok"] > 0 and all(k.startswith(("http_", "stream_error:")) for k in after["errors"]), after
    assert failover["replacement_running_s"] is not None
    assert failover["tasks"]["all_succeeded"], failover["tasks"]

    autoscale = phases["autoscale"]
    assert autoscale["scale_up_s"] is not None and autoscale["scale_down_s"] is not None, autoscale["marks_s"]
    assert "| replicas | streams |" in report["tables"] and "| failover | value |" in report["tables"]


def test_cluster_config_starts_on_fake_gpus_with_shared_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/ray_config.gpu-cluster.yaml as written (autoscaled GPU replicas from min_replicas, autoscaled Ingress,
    a proxy on every node, Redis stores) on a local Ray with 2 fake GPUs and a real redis-server; only the
    addresses, the model (simulated) and the CPU reservations are this machine's."""
    import httpx
    import ray
    import yaml
    from ray import serve

    from bench.multi_gpu_bench import CLUSTER_CONFIG, app_running, deploy, model_replica_states, wait_for
    from tests.redis_harness import RedisServer, require_redis_server
    from tests.serve_harness import free_port

    require_redis_server()
    stop_shared_ray()
    key, port = "sk-gpu-cluster-config", free_port()
    env = {**SAFE_ENV, "KIMIRAY_HOME": str(tmp_path / "home"), "KIMIRAY_API_KEYS": key, "PYTHONPATH": str(REPO)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with RedisServer(tmp_path / "redis", appendfsync="everysec") as redis:
        raw = yaml.safe_load(CLUSTER_CONFIG.read_text())
        raw["http_options"].update(host="127.0.0.1", port=port)
        app = raw["applications"][0]
        app["runtime_env"]["env_vars"].update(env)
        app["args"].update(host="127.0.0.1")
        app["args"]["model"]["model"] = "sim:h100"
        app["args"]["tasks"]["stores_url"] = redis.url
        deployments = {d["name"]: d for d in app["deployments"]}
        for deployment in deployments.values():
            deployment["ray_actor_options"]["num_cpus"] = 0.05
        min_replicas = deployments["ModelServer"]["autoscaling_config"]["min_replicas"]
        ray.init(include_dashboard=False, num_cpus=8, num_gpus=min_replicas, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": env})
        try:
            deploy(raw)
            wait_for("the cluster config RUNNING at min_replicas",
                     lambda: app_running() and model_replica_states() == {"RUNNING": min_replicas}, timeout=180)
            assert ray.available_resources().get("GPU", 0) == 0  # each replica holds one (fake) GPU
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                              timeout=60) as http:
                reply = http.post("/v1/chat/completions", json={
                    "model": "kimi-vl", "max_tokens": 5, "messages": [{"role": "user", "content": "hello"}]})
                assert reply.status_code == 200, reply.text
                task = http.post("/v1/tasks", json={"type": "chat", "input": {
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}})
                assert task.status_code == 202, task.text
                task_id = task.json()["id"]
                wait_for("the task to succeed (through Redis)",
                         lambda: http.get(f"/v1/tasks/{task_id}").json()["status"] == "succeeded", timeout=60)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
