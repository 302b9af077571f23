"""bench/serving_bench.py: its smoke mode end to end (the tiny checkpoint in the real AsyncEngine on CPU, both
workloads, the service's chat conversion for the screenshots) and the pieces its figures rest on (seeded
workloads, Poisson arrivals, percentiles, the SLO capacity estimate)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from bench import serving_bench as sb

RATES = [8, "inf"]
REQUESTS = 6
OUTPUT = 8


def test_smoke_run_both_workloads(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    results = sb.main(["--device", "cpu", "--tiny", "--rates", "8", "inf", "--num-requests", str(REQUESTS),
                       "--output-tokens", str(OUTPUT), "--warmup-ladder", "1", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["request_conversion"].startswith("service")  # screenshots went through the service converter
    assert results["device"] == "cpu" and results["warmup"]["ladder"] == [1, 2] and results["warmup"]["failed"] == 0
    for workload in ("random", "mixed"):
        entry = results["workloads"][workload]
        rows = entry["rows"]
        assert [r["rate"] for r in rows] == RATES
        for row in rows:
            assert row["completed"] == row["requests"] == REQUESTS and row["failed"] == 0, row
            assert row["output_tokens_total"] == REQUESTS * OUTPUT  # EOS ignored: every request runs to length
            assert 0 < row["ttft_p50_ms"] <= row["ttft_p99_ms"] <= row["e2e_p99_ms"]
            assert 0 <= row["tpot_p50_ms"] <= row["tpot_p99_ms"]
            # gaps between tokens as the client sees them: two deltas can arrive in one wake-up (a gap of ~0)
            assert 0 <= row["itl_p50_ms"] <= row["itl_p99_ms"] and row["itl_p99_ms"] > 0
            assert row["request_throughput"] > 0 and row["output_tok_per_s"] > 0
            # fresh prompts and screenshots per rate: no prefix- or vision-cache help between runs
            assert row["engine"]["vision_cache_hits"] == 0
            if workload == "random":
                assert row["prompt_tokens_mean"] == 1024 and row["image_requests"] == 0
                assert row["engine"]["prefix_cache_hit_blocks"] == 0
            else:
                assert row["image_requests"] == round(0.25 * REQUESTS)
                assert row["ttft_p50_image_ms"] > 0 and row["ttft_p50_text_ms"] > 0
                assert row["engine"]["vision_cache_misses"] == row["image_requests"]
        cap = entry["capacity"]
        assert cap["slo_ttft_p99_s"] == 1.0 and cap["req_per_s"] is not None
        assert "| rate (req/s) | done | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms |" in entry["markdown"]
        assert ("Screenshot requests' TTFT" in entry["markdown"]) == (workload == "mixed")


def test_workloads_are_seeded_and_fresh_per_run() -> None:
    cfg = sb.WorkloadConfig(prompt_tokens=32, image_size=(320, 180), vocab_limit=768)
    first = sb.build_requests("mixed", 8, "0:mixed:1", cfg)
    again = sb.build_requests("mixed", 8, "0:mixed:1", cfg)
    other = sb.build_requests("mixed", 8, "0:mixed:2", cfg)
    assert first == again
    assert [s.kind for s in first].count("image") == 2
    texts = [s.prompt_ids for s in first if s.kind == "text"]
    assert all(len(ids) == 32 and all(0 <= t < 768 for t in ids) for ids in texts)
    assert not {tuple(s.prompt_ids) for s in other if s.prompt_ids} & {tuple(ids) for ids in texts}
    images = [s.chat_body["messages"][0]["content"][0]["image_url"]["url"] for s in first + other if s.chat_body]
    assert len(set(images)) == len(images) and images[0].startswith("data:image/png;base64,")
    assert all(s.kind == "text" for s in sb.build_requests("random", 8, "0:random:1", cfg))


def test_poisson_offsets() -> None:
    offsets = sb.poisson_offsets(4000, 8.0, random.Random("x"))
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert abs(offsets[-1] / 3999 - 1 / 8.0) < 0.1 / 8.0  # mean gap 1/rate
    assert offsets == sb.poisson_offsets(4000, 8.0, random.Random("x"))
    assert sb.poisson_offsets(5, math.inf, random.Random("x")) == [0.0] * 5


def test_percentile_matches_numpy() -> None:
    values = [0.3, 0.1, 0.7, 0.2, 0.9, 0.4, 0.35]
    for q in (0, 50, 90, 99, 100):
        assert math.isclose(sb.percentile(values, q), float(np.percentile(values, q)))
    assert sb.percentile([], 50) is None


def row(rate, p99: float | None, failed: int = 0) -> dict:
    return {"rate": rate, "ttft_p99_ms": p99, "failed": failed}


def test_capacity_interpolates_between_the_bracketing_rates() -> None:
    cap = sb.capacity([row(2, 400.0), row(4, 800.0), row(8, 1800.0), row("inf", 5000.0)], 1.0)
    assert cap["bound"] == "interpolated" and cap["bracket"] == [4, 8]
    assert math.isclose(cap["req_per_s"], 4 + 200 * 4 / 1000)
    # a run with failed requests fails the SLO even when the completed ones were fast
    assert sb.capacity([row(2, 400.0), row(4, 500.0, failed=1)], 1.0)["bracket"] == [2, 4]
    assert sb.capacity([row(2, 400.0), row(4, 900.0)], 1.0) | {"note": ""} == {
        "slo_ttft_p99_s": 1.0, "req_per_s": 4, "bound": "at least", "note": ""}
    assert sb.capacity([row(2, 1400.0), row(4, 2000.0)], 1.0)["bound"] == "below"
    assert sb.bracket([row(1, 100.0), row(3, 3000.0)], 1.0) == (1, 3)


def test_chat_conversion_without_the_service_converter(monkeypatch) -> None:
    """The GPU machine lacks PyAV (connectors.media): screenshots are then decoded by engine.processor into the
    same engine messages."""
    import asyncio
    import sys

    monkeypatch.setitem(sys.modules, "connectors.openai_messages", None)  # import fails like a missing dependency
    convert, label = sb.chat_converter()
    assert label.startswith("engine.processor.load_image")
    body = sb.image_chat_body(random.Random(1), (1280, 720), 8, 16)
    request = asyncio.run(convert(body, "r1"))
    image, text = request.messages[0]["content"]
    assert image["type"] == "image" and image["image"].size == (1280, 720)
    assert text == body["messages"][0]["content"][1]
    assert (request.max_tokens, request.ignore_eos, request.request_id) == (16, True, "r1")
