"""Video pipeline throughput on a CPU machine.

  decode_1080p   every frame of a generated 1920x1080 H.264 clip decoded and resized (longer side 896):
                 frames/s and real-time factor (video seconds per wall second)
  sample_1080p   the agent's sampling of the same clip (64-frame budget, scene changes + uniform)
  end_to_end     a generated 10-minute 640x360 video (scene changes every 40 s) as a ``video_analysis``
                 ``summarize`` task through ``LocalRuntime`` with the tiny checkpoint (embedded store, the real
                 engine, no Ray): wall time, frames, windows, and time spent in model calls

Usage: python bench/video_bench.py [--seconds-1080p 30] [--minutes 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds-1080p", type=float, default=30.0)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import kimiray
    from pipelines.video.decode import iter_frames
    from pipelines.video.sample import sample_frames
    from pipelines.video.synthetic import make_video

    out: dict = {"machine": f"{platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}"}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        hd = make_video(Path(tmp) / "hd.mp4", seconds=args.seconds_1080p, fps=30, size=(1920, 1080),
                        scenes=[(0.0, "one", (200, 30, 30)), (args.seconds_1080p / 2, "two", (30, 30, 200))])
        out["generate_1080p_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        count = sum(1 for _ in iter_frames(hd.data, max_side=896))
        elapsed = time.perf_counter() - started
        out["decode_1080p"] = {"frames": count, "frames_per_s": round(count / elapsed, 1),
                               "realtime_factor": round(hd.duration / elapsed, 2)}
        started = time.perf_counter()
        frames = sample_frames(hd.data, budget=64, strategy="hybrid", max_side=896)
        elapsed = time.perf_counter() - started
        out["sample_1080p"] = {"frames": len(frames), "seconds": round(elapsed, 2),
                               "realtime_factor": round(hd.duration / elapsed, 2)}

        seconds = args.minutes * 60
        scenes = [(float(t), f"scene {i}", ((i * 70) % 255, (i * 130) % 255, (i * 40 + 80) % 255))
                  for i, t in enumerate(range(0, int(seconds), 40))]
        long = make_video(Path(tmp) / "long.mp4", seconds=seconds, fps=2, size=(640, 360), scenes=scenes)
        with kimiray.LocalRuntime(stores_url=f"sqlite:///{tmp}/stores") as runtime:
            started = time.perf_counter()
            task = runtime.submit("video_analysis", {
                "file": {"name": "long.mp4", "data": base64.b64encode(long.data).decode()}, "kind": "summarize",
                "max_frames": 64, "max_side": 448, "max_output_tokens": 256, "max_observations": 4,
                "max_text_chars": 60})
            done = runtime.wait(task.id, timeout=7200)
            elapsed = time.perf_counter() - started
        result = done.result
        out["end_to_end_10min"] = {"seconds": round(elapsed, 1), "video_seconds": seconds,
                                   "frames_sampled": result["frames_sampled"], "windows": result["windows"],
                                   "timeline_entries": len(result["timeline"]),
                                   "realtime_factor": round(seconds / elapsed, 2)}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
