"""bench/load_run.py in miniature (300 requests, 4 workers): the load harness works, and a short mixed load on a
separate server process ends with no error, every task succeeded and the server's memory flat."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(180)


def test_a_short_mixed_load_has_no_error_and_no_memory_growth() -> None:
    from bench.load_run import run

    out = run(requests=300, concurrency=4, max_tokens=4, rss_growth=0.15, runner_concurrency=4)
    assert out["errors"] == 0, out["error_samples"]
    assert out["task_statuses"] == {"succeeded": out["tasks_submitted"]} and out["tasks_submitted"] >= 80
    assert {kind: v["count"] for kind, v in out["latency"].items()}["chat"] == 120
    assert out["passed"], out["failures"]
