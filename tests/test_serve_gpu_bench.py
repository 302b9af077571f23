"""bench/serve_gpu_bench.py's CPU smoke: every part the GPU run relies on (engine side, the served app on a Ray of
its own, both tasks, the replica killed under load) runs end to end on the tiny checkpoint, so a GPU run's
minutes are not lost to a broken script."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_serve_gpu_bench_smoke_on_cpu(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import serve_gpu_bench
    from tests.serve_harness import stop_shared_ray

    stop_shared_ray()  # the bench starts (and stops) a Ray of its own
    monkeypatch.setenv("KIMIRAY_HOME", str(tmp_path / "home"))
    out = serve_gpu_bench.main([
        "--device", "cpu", "--concurrency", "1", "2", "--max-tokens", "4", "--rounds", "1", "--min-requests", "2",
        "--pages", "2", "--fault-streams", "2", "--fault-tasks", "1", "--fault-tokens", "3500",
        "--fault-after-s", "1.0", "--task-timeout", "240", "--json", str(tmp_path / "out.json")])
    for side in ("engine", "served"):
        result = out[side]
        assert not result["errors"], result["errors"]
        for level in (1, 2):
            assert result["streaming"][level]["ok"] == result["streaming"][level]["requests"] >= 2
            assert result["streaming"][level]["tpot_ms_p50"] > 0 and result["streaming"][level]["ttft_ms_p50"] > 0
        assert result["non_streaming"]["ok"] == 4 and result["screenshot"]["ttft_ms_p50"] > 0
        assert result["tasks"]["chat"]["status"] == "succeeded", result["tasks"]
        assert result["tasks"]["contract_extraction"]["status"] == "succeeded", result["tasks"]
        assert result["tasks"]["contract_extraction"]["page_count"] == 2
    # both sides plan the contract with the same checkpoint's window (the engine side once planned with the tiny
    # checkpoint's whatever it ran: 58 chunks against the served side's 2 on the GPU)
    assert out["engine"]["tasks"]["contract_extraction"]["chunks"] == out["served"]["tasks"]["contract_extraction"][
        "chunks"]
    served = out["served"]
    assert served["deploy_to_ready_s"] > 0
    startup = served["replica_startup"]  # the replica's own cold start, from /v1/stats
    assert 0 < startup["load_s"] <= startup["process_start_to_ready_s"] < served["deploy_to_ready_s"] + 60
    fault = served["fault"]
    assert "error" not in fault, fault
    # every stream cut by the kill ends with the API's clear error, not a short "finished" answer
    assert fault["streams_ended_with_error"] == 2, fault["streams"]
    assert all("not available" in s["outcome"] for s in fault["streams"]), fault["streams"]
    assert fault["replacement_answers_after_s"] is not None
    assert fault["replacement_startup"]["process_start_to_ready_s"] < fault["replacement_answers_after_s"] + 5
    assert fault["tasks_succeeded"] == 1, fault["tasks"]
    metrics = [row["metric"] for row in out["comparison"]]
    assert "tpot_ms_p50 c=1" in metrics and "non-streaming tok/s c=2" in metrics
    assert (tmp_path / "out.json").exists()


def test_deployment_overrides_apply_and_reject_unknown_names() -> None:
    from bench.serve_gpu_bench import override_deployments, production_settings

    _, options = production_settings({})
    override_deployments(options, ["Ingress.num_replicas=2", 'ModelServer.ray_actor_options={"num_cpus": 2}'])
    assert options["Ingress"]["num_replicas"] == 2
    assert options["ModelServer"]["ray_actor_options"] == {"num_cpus": 2}
    with pytest.raises(SystemExit, match="NAME.KEY=JSON"):
        override_deployments(options, ["Proxy.num_replicas=2"])
    with pytest.raises(SystemExit):
        override_deployments(options, ["Ingress=2"])
