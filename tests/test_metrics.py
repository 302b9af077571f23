"""serve_app/metrics.py: no-ops without Ray; every method records without error in a Ray driver and task."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.metrics import ServeMetrics, status_class

REPO = Path(__file__).resolve().parents[1]

STATS = {  # the shape of AsyncEngine.stats()
    "running": 3,
    "waiting": 2,
    "cache_usage": 0.4321,
    "free_blocks": 10,
    "num_blocks": 20,
    "prefix_cache_hit_blocks": 5,
    "prefix_cache_query_blocks": 20,
    "vision_cache_hits": 7,
    "vision_cache_misses": 3,
    "steps": 100,
    "preemptions": 1,
    "alive": True,
    "seconds_since_step": 0.01,
}


def exercise(m: ServeMetrics) -> None:
    """Call every method, including edge values that must be tolerated."""
    m.request("/v1/chat/completions", 200, "0123456789ab", 0.25)
    m.request("/v1/chat/completions", 429, "0123456789ab", 0.001)
    m.request("/v1/models", 401, None, 0.0)
    m.request("/no/such/route", "500", "anonymous", None)
    m.request(None, "weird", "", -1.0)  # type: ignore[arg-type]
    m.tokens(120, 34)
    m.tokens(0, 0)  # Ray counters refuse 0: must be skipped, not raise
    m.generation_rate(42.5)
    m.generation_rate(0.0)
    m.engine_stats(STATS)
    m.engine_stats({"running": 0, "waiting": 0, "prefix_cache_query_blocks": 0, "vision_cache_hits": 0,
                    "vision_cache_misses": 0, "alive": False})
    m.engine_stats({})


def test_status_class():
    assert [status_class(s) for s in (200, 201, 302, 404, 429, 503, "200")] == \
        ["2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "2xx"]
    assert status_class(None) == status_class("x") == status_class(99) == status_class(600) == "unknown"


def test_noop_without_ray_does_not_even_import_ray():
    code = (
        "import sys\n"
        "from tests.test_metrics import exercise\n"
        "from serve_app.metrics import ServeMetrics\n"
        "m = ServeMetrics('kimi-vl')\n"
        "exercise(m)\n"
        "assert not m.active and m._metrics is None\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_noop_with_ray_imported_but_not_initialised():
    pytest.importorskip("ray")
    # in a fresh process: this one may hold the session's shared Ray (tests/serve_harness.py)
    code = (
        "import ray\n"
        "from tests.test_metrics import exercise\n"
        "from serve_app.metrics import ServeMetrics\n"
        "assert not ray.is_initialized()\n"
        "m = ServeMetrics('kimi-vl')\n"
        "exercise(m)\n"
        "assert not m.active and m._metrics is None\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_disabled_is_always_noop():
    m = ServeMetrics(enabled=False)
    exercise(m)
    assert not m.active


# ---------------------------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def ray_local():
    """The session's shared local Ray (its workers import serve_app and this module by name)."""
    pytest.importorskip("ray")
    from tests.serve_harness import shared_ray

    return shared_ray()


def test_records_in_driver(ray_local, caplog):
    m = ServeMetrics("kimi-vl", routes={"/v1/chat/completions", "/v1/models"})
    with caplog.at_level(logging.WARNING, logger="serve_app.metrics"):
        exercise(m)
    assert m.active
    assert m._warned == set(), m._warned
    assert not [r for r in caplog.records if r.name == "serve_app.metrics"]
    names = {metric.info["name"] for metric in m._metrics.values()}
    assert all(n.startswith("kimiray_") for n in names)
    assert "kimiray_requests" in names and "kimiray_request_latency_seconds" in names
    tags = {metric.info["name"]: metric.info["tag_keys"] for metric in m._metrics.values()}
    assert [n for n, t in tags.items() if "key_id" in t] == ["kimiray_requests"]
    assert m._route("/no/such/route") == "other"


def test_records_in_ray_task(ray_local):
    @ray_local.remote(num_cpus=0)
    def in_task():
        from serve_app.metrics import ServeMetrics
        from tests.test_metrics import exercise

        m = ServeMetrics("kimi-vl")
        exercise(m)
        return m.active, sorted(m._warned), m._replica

    active, warned, replica = ray_local.get(in_task.remote(), timeout=120)
    assert active and warned == [] and replica == "driver"


def test_recording_errors_are_swallowed(ray_local, caplog):
    m = ServeMetrics("kimi-vl")
    assert m.active

    class Broken:
        def inc(self, *a, **k):
            raise RuntimeError("exporter down")

    m._metrics["requests"] = Broken()
    with caplog.at_level(logging.WARNING, logger="serve_app.metrics"):
        m.request("/v1/models", 200, "k", 0.1)
        m.request("/v1/models", 200, "k", 0.1)
    assert m._warned == {"requests"}
    assert len([r for r in caplog.records if "exporter down" in r.getMessage()]) == 1  # logged once
