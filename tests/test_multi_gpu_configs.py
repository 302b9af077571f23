"""The several-GPU deployment configs (deploy/) parse through the code that loads them and say what they promise:
one ModelServer replica per GPU, autoscaling with explicit delays on a cluster, shared stores wherever there is more
than one node, and a KubeRay example whose GPU pods can hold every replica Serve may ask for. The multi-GPU bench
builds its deployments from the same files (checked here too); tests/test_multi_gpu_bench.py starts them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from connectors.sim_engine import PROFILES, sim_profile
from serve_app.auth import AuthConfigError, check_bind_allowed
from serve_app.config import AppConfig
from serve_app.store_guard import PrivateStoreOnCluster, check_shared_stores

REPO = Path(__file__).resolve().parents[1]
ONE_HOST = REPO / "deploy" / "ray_config.gpus-one-host.yaml"
CLUSTER = REPO / "deploy" / "ray_config.gpu-cluster.yaml"
KUBERAY = REPO / "deploy" / "kuberay-rayservice.yaml"


def _schema(path: Path) -> tuple[ServeDeploySchema, AppConfig, dict[str, Any]]:
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = schema.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    return schema, AppConfig.model_validate(app.args), {d.name: d for d in app.deployments}


def test_one_host_config_puts_one_replica_on_each_gpu() -> None:
    schema, config, deployments = _schema(ONE_HOST)
    model = deployments["ModelServer"]
    assert model.ray_actor_options.num_gpus == 1
    assert model.num_replicas >= 2 and "autoscaling_config" not in model.model_fields_set  # N GPUs = N replicas
    assert model.max_ongoing_requests and model.max_queued_requests
    assert deployments["Ingress"].num_replicas >= 2 and not deployments["Ingress"].ray_actor_options.num_gpus
    assert config.model.model and config.tasks.stores_url is None  # a real checkpoint; embedded stores on one node
    check_shared_stores(config.tasks, alive_nodes=1)
    with pytest.raises(PrivateStoreOnCluster):  # the same file on a second node is refused, as its comment says
        check_shared_stores(config.tasks, alive_nodes=2)
    assert schema.http_options.host == config.host == "127.0.0.1"


def test_cluster_config_autoscales_gpu_replicas_on_shared_stores() -> None:
    schema, config, deployments = _schema(CLUSTER)
    model = deployments["ModelServer"]
    assert model.ray_actor_options.num_gpus == 1
    scaling = AutoscalingConfig(**model.autoscaling_config)
    assert 2 <= scaling.min_replicas < scaling.max_replicas
    assert {"upscale_delay_s", "downscale_delay_s"} <= set(model.autoscaling_config)  # stated, not defaulted
    assert scaling.downscale_delay_s > scaling.upscale_delay_s  # slow to release a GPU replica, quick to add one
    assert scaling.target_ongoing_requests < model.max_ongoing_requests
    assert str(getattr(schema.proxy_location, "value", schema.proxy_location)) == "EveryNode"
    assert config.tasks.stores_url and config.tasks.stores_url.startswith(("redis://", "redis+sentinel://"))
    check_shared_stores(config.tasks, alive_nodes=3)
    AutoscalingConfig(**deployments["Ingress"].autoscaling_config)
    assert schema.http_options.host == config.host == "0.0.0.0"
    with pytest.raises(AuthConfigError):  # a public bind without API keys is refused before anything starts
        check_bind_allowed(config.host, False)
    check_bind_allowed(config.host, True)


def test_kuberay_gpu_pods_follow_the_replicas() -> None:
    doc = yaml.safe_load(KUBERAY.read_text())
    cluster = doc["spec"]["rayClusterConfig"]
    serve = ServeDeploySchema.model_validate(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    model = {d.name: d for d in serve.applications[0].deployments}["ModelServer"]
    scaling = AutoscalingConfig(**model.autoscaling_config)
    assert {"upscale_delay_s", "downscale_delay_s"} <= set(model.autoscaling_config)
    assert model.ray_actor_options.num_gpus == 1
    assert cluster["enableInTreeAutoscaling"] is True  # pending GPU replicas bring GPU pods
    gpu_groups = [g for g in cluster["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups
    def gpus(bound: str) -> int:
        return sum(g[bound] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                   for g in gpu_groups)

    assert scaling.max_replicas <= gpus("maxReplicas")  # every replica Serve may ask for can get a GPU
    assert scaling.min_replicas <= gpus("minReplicas")  # the minimum runs without waiting for a new pod


def test_bench_deploys_the_one_host_file_with_its_gpu_placement(tmp_path: Path) -> None:
    from bench.multi_gpu_bench import Setup, autoscaling_config, serve_config

    setup = Setup(model="sim:h100-slow10", port=18123, home=tmp_path, fake_gpus=True, max_tokens=8)
    raw = serve_config(setup, replicas=3)
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    model = {d.name: d for d in app.deployments}["ModelServer"]
    assert model.num_replicas == 3 and model.ray_actor_options.num_gpus == 1  # placement kept from the file
    config = AppConfig.model_validate(app.args)
    assert config.model.model == "sim:h100-slow10" and schema.http_options.port == 18123
    args = type("Args", (), {"replicas": [1, 4], "upscale_delay_s": 2.0, "downscale_delay_s": None,
                             "metrics_interval_s": None, "look_back_period_s": None,
                             "target_ongoing_requests": None})()
    scaling = autoscaling_config(args)
    cluster_file = yaml.safe_load(CLUSTER.read_text())["applications"][0]["deployments"][0]["autoscaling_config"]
    assert scaling["min_replicas"] == 1 and scaling["max_replicas"] == 4 and scaling["upscale_delay_s"] == 2.0
    assert scaling["downscale_delay_s"] == cluster_file["downscale_delay_s"]  # the file's, unless overridden
    auto = ServeDeploySchema.model_validate(serve_config(setup, autoscaling=scaling)).applications[0]
    model = {d.name: d for d in auto.deployments}["ModelServer"]
    assert AutoscalingConfig(**model.autoscaling_config).max_replicas == 4


def test_slowed_sim_profile_keeps_the_h100_shape() -> None:
    fast, slow = PROFILES["h100"], sim_profile("sim:h100-slow10")
    for batch in (1, 8, 20, 64, 100):
        assert slow.decode_ms(batch) == pytest.approx(10 * fast.decode_ms(batch))
    assert slow.prefill_tok_s == pytest.approx(fast.prefill_tok_s / 10) and slow.max_batch == fast.max_batch


def test_bench_counts_tokens_in_the_window_they_were_streamed() -> None:
    from bench.multi_gpu_bench import Outcome, summarize, tokens_between

    # first token at 1 s, 10 more spread evenly until 11 s
    reply = Outcome(started=0.0, ended=11.0, ttft=1.0, tokens=11)
    assert tokens_between(reply, 0.0, 100.0) == pytest.approx(11)
    assert tokens_between(reply, 0.0, 6.0) == pytest.approx(1 + 5)  # half of the decode time
    assert tokens_between(reply, 6.0, 11.0) == pytest.approx(5)
    broken = Outcome(started=0.0, ended=3.0, ttft=1.0, tokens=5, kind="transport:ReadError")
    assert tokens_between(broken, 0.0, 10.0) == 0  # a broken stream delivers no answer
    assert reply.tpot == pytest.approx(1.0) and broken.clear_error is False
    assert Outcome(started=0.0, kind="stream_error:unavailable").clear_error
    summary = summarize([reply, broken, Outcome(started=5.0, ended=9.0, ttft=0.5, tokens=2)], 0.0, 10.0)
    assert summary["requests"] == 2 and summary["ok"] == 1  # ended inside the window: broken + the short one
    assert summary["errors"] == {"transport:ReadError": 1}
    assert summary["tokens_per_s"] == pytest.approx((1 + 9 + 2) / 10, abs=0.05)
