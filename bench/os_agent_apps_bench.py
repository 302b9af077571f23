"""OS-agent step latency on the real-application tasks (Chromium on the loopback web app, on Xvfb).

Each browser task of ``agents.os_agent.harness.web_tasks`` runs ``--runs`` times through the real TaskRunner and
``OSAgentLoop`` with the X11 executor; the model is the scripted one of the tests (``--model scripted``, answers in
Kimi-VL's Toolcall format: the executor and browser path without model noise) or the tiny checkpoint in the real
engine (``--model tiny``: random actions; the point is that the loop ends cleanly). Prints the per-phase split
(screenshot, encode, model, execute incl. settle) over all steps, and per task the success rate.
``--frame PATH`` also saves one frame of the web_login recording (the README's picture).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.os_agent_bench import summarize  # noqa: E402

SCREEN = (1024, 768)
PASSWORD = "bench-password-1"


async def main(args: argparse.Namespace) -> dict:
    import os

    from agents.os_agent.agent import register_desktop
    from agents.os_agent.harness.web_tasks import WEB_TASKS, run_app_task
    from agents.registry import build_registry
    from agents.runner import RunnerOptions, TaskRunner
    from connectors.desktop.x11 import X11Executor
    from connectors.desktop.xvfb import VirtualDisplay
    from connectors.stores import open_stores
    from connectors.stores.base import TaskSubmission
    from tests.os_agent_helpers import AppReadingModel

    os.environ["KIMIRAY_OS_SECRETS"] = json.dumps({"crm_password": PASSWORD})
    tiny = None
    if args.model == "tiny":
        import torch

        from connectors.backend import LocalBackend
        from connectors.model_client import BackendModelClient
        from connectors.paths import tiny_checkpoint_dir
        from engine.runtime.engine import AsyncEngine

        torch.set_num_threads(2)
        tiny = BackendModelClient(LocalBackend(AsyncEngine.from_pretrained(str(tiny_checkpoint_dir()),
                                                                           device="cpu")))
    work = Path(tempfile.mkdtemp())
    phases: dict[str, list[float]] = {"screenshot": [], "encode": [], "model": [], "execute": [], "step": []}
    tasks: dict[str, dict] = {}
    with VirtualDisplay(*SCREEN) as display:
        register_desktop("xvfb", lambda: X11Executor(display.display))
        for name in args.tasks or sorted(WEB_TASKS):
            task = WEB_TASKS[name]
            for run in range(args.runs):
                stores = open_stores(f"sqlite:///{work / f'{name}-{run}'}")

                async def agent(task, read_state, stores=stores):
                    model = tiny or AppReadingModel(read_state, SCREEN, display.env())
                    runner = TaskRunner(stores, build_registry(), model, RunnerOptions(lease_s=60, retry_delay_s=0))
                    await stores.tasks.submit("bench", TaskSubmission(type="os_agent", input={
                        "goal": task.goal, "desktop": "xvfb", "max_steps": args.max_steps, "settle_s": args.settle,
                        "max_output_tokens": 48, "screenshot_max_side": 768, "max_seconds": 300}))
                    return await runner.run_once()

                outcome = await run_app_task(task, display.env(), work / f"app-{name}-{run}", agent, screen=SCREEN,
                                             password=PASSWORD)
                done = outcome.agent_result
                result = done.result or {}
                row = tasks.setdefault(name, {"runs": 0, "passed": 0, "steps": 0, "outcomes": []})
                row["runs"] += 1
                row["passed"] += int(outcome.passed)
                row["steps"] += result.get("steps", 0)
                row["outcomes"].append(result.get("outcome", done.status))
                for step in result.get("trajectory", []):
                    t = step["timings"]
                    for p in ("screenshot", "encode", "model"):
                        if p in t:
                            phases[p].append(t[p])
                    if "execute" in t:
                        phases["execute"].append(t["execute"])
                    phases["step"].append(sum(t.values()))
                if args.frame and name == "web_login" and run == 0 and "recording" in result.get("artifacts", {}):
                    import av

                    data = await stores.blobs.get("bench", result["artifacts"]["recording"]["ref"])
                    with av.open(io.BytesIO(data)) as container:
                        frames = [f.to_image() for f in container.decode(video=0)]
                    typed = next(i for i, s in enumerate(result["trajectory"])
                                 if (s["action"] or {}).get("kind") == "type" and "secret" in s["action"]["text"])
                    frames[2 * typed + 2].save(args.frame)  # the frame after typing: masked dots, the next click
    return {"model": args.model, "runs": args.runs, "settle_s": args.settle, "python": platform.python_version(),
            "phases_ms": {p: summarize(v) for p, v in phases.items() if v}, "tasks": tasks}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["scripted", "tiny"], default="scripted")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", nargs="*")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--settle", type=float, default=0.3)
    parser.add_argument("--frame", type=Path)
    parser.add_argument("--json", type=Path)
    out = asyncio.run(main(parser.parse_args()))
    text = json.dumps(out, indent=2)
    print(text)
    if parser.parse_args().json:
        parser.parse_args().json.write_text(text)
