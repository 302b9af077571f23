"""A generated 2-hour video: bounded decoding (seek-based sampling) and the two passes, end to end.

The video (generated once in a temp dir, cheaply: 160x90, 1 fps, libx264 ultrafast, a keyframe every 60 s so
seeking matters) shows a grey street with a burned-in clock and a red car from 1:23:20 to 1:23:50.

  probe            container metadata only
  coarse_seek      64 frames sampled uniformly by seeking (what the agent does past 30 minutes)
  coarse_full      baseline: the same 64 frames after a scene-detection pass over every frame
                   (what sampling did for every length before)
  agent_scripted   ``moments`` through ``LocalRuntime`` with the scripted frame-reading model of the tests
                   (it reports red frames): where the refined moment lands, per-pass frames / decoded frames /
                   seeks / model calls / tokens, wall time, peak RSS
  agent_tiny       the same task with the tiny checkpoint in the real engine (random answers: timing only)

Usage: python bench/video_long_bench.py [--hours 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EVENT = (5000.0, 5030.0)


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _agent(runtime, data: bytes) -> dict:
    started = time.perf_counter()
    task = runtime.submit("video_analysis", {
        "file": {"name": "long.mp4", "data": base64.b64encode(data).decode()}, "kind": "moments",
        "question": "When does the red car pass?", "max_frames": 64, "dense_frames": 32, "max_side": 160,
        "max_output_tokens": 256, "max_observations": 16, "max_text_chars": 40})
    done = runtime.wait(task.id, timeout=3600, raise_on_failure=False)
    elapsed = time.perf_counter() - started
    result = done.result or {}
    return {"status": done.status, "seconds": round(elapsed, 1), "passes": result.get("passes"),
            "moments": [{k: m[k] for k in ("start", "end", "range", "resolution_s", "found_in")}
                        for m in result.get("moments", [])][:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import kimiray
    from pipelines.video.decode import DecodeStats, probe
    from pipelines.video.sample import fetch_frames, sample_frames, scene_cuts, uniform_times
    from pipelines.video.synthetic import make_video
    from tests.test_video_second_look import FrameReader

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    out: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}",
                 "commit": commit}
    seconds = args.hours * 3600
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        clip = make_video(Path(tmp) / "long.mp4", seconds=seconds, fps=1, size=(160, 90), gop=60,
                          scenes=[(0.0, "street", (90, 90, 90)), (EVENT[0], "red car", (220, 30, 30)),
                                  (EVENT[1], "street", (90, 90, 90))])
        out["video"] = {"seconds": seconds, "frames": int(seconds), "bytes": len(clip.data),
                        "generate_s": round(time.perf_counter() - started, 1), "keyframe_every_s": 60}
        started = time.perf_counter()
        probe(clip.data)
        out["probe_s"] = round(time.perf_counter() - started, 4)
        stats = DecodeStats()
        started = time.perf_counter()
        frames = fetch_frames(clip.data, uniform_times(seconds, budget=64), max_side=160, stats=stats)
        out["coarse_seek"] = {"frames": len(frames), "seconds": round(time.perf_counter() - started, 2),
                              "decoded": stats.decoded, "seeks": stats.seeks}
        detect, fetch = DecodeStats(), DecodeStats()
        started = time.perf_counter()
        cuts = scene_cuts(clip.data, stats=detect)
        frames = sample_frames(clip.data, budget=64, max_side=160, detect_max_s=None, stats=fetch)
        out["coarse_full"] = {"frames": len(frames), "cuts": len(cuts),
                              "seconds": round(time.perf_counter() - started, 2),
                              "decoded": detect.decoded * 2 + fetch.decoded,  # sample_frames detects again
                              "seeks": fetch.seeks}
        rss_before = _rss_mb()
        with kimiray.LocalRuntime(model_client=FrameReader(), stores_url=f"sqlite:///{tmp}/s1") as runtime:
            out["agent_scripted"] = _agent(runtime, clip.data)
        out["agent_scripted"]["peak_rss_mb"] = {"before": rss_before, "after": _rss_mb()}
        from engine.tiny import write_tiny_checkpoint

        tiny = str(write_tiny_checkpoint(Path(tmp) / "tiny", seed=0))
        with kimiray.LocalRuntime(tiny, stores_url=f"sqlite:///{tmp}/s2") as runtime:
            out["agent_tiny"] = _agent(runtime, clip.data)
        out["agent_tiny"]["peak_rss_mb"] = _rss_mb()
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
