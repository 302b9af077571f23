"""OS-agent step latency.

CPU mode (default): a real Xvfb desktop with the Tk harness app, the tiny checkpoint in the in-process engine,
the real ``OSAgentLoop`` on embedded stores; every step's split (screenshot, encode = PNG decode + downscale +
blob + prompt fitting, model, execute incl. the settle pause) over N steps. JSON action mode by default so the
random-weight model's actions really run.

GPU mode (``--gpu-model-step``): the model part of one agent step with the full-size A3B architecture (random
bf16 weights) for a 1920x1080 screenshot: the real step prompt (system prompt, goal, one earlier screenshot and
reply, the current screenshot) through the engine, to the first token and to a 48-token action reply; then the
next step, which reuses the cached prefix and the previous screenshot's vision features.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(values: list[float]) -> dict[str, float]:
    return {"mean_ms": round(statistics.fmean(values) * 1000, 1), "p50_ms": round(_pct(values, 0.5) * 1000, 1),
            "p95_ms": round(_pct(values, 0.95) * 1000, 1), "n": len(values)}


async def cpu_steps(args: argparse.Namespace) -> dict:
    import torch

    from agents.base import AgentContext
    from agents.os_agent.agent import OSAgentLoop
    from agents.os_agent.harness.launch import launch_app, stop_app
    from agents.os_agent.inputs import OSAgentInput
    from connectors.desktop.x11 import X11Executor
    from connectors.desktop.xvfb import VirtualDisplay
    from connectors.model_client import BackendModelClient
    from connectors.stores import open_stores
    from engine.runtime.engine import AsyncEngine
    from connectors.paths import tiny_checkpoint_dir
    from connectors.backend import LocalBackend

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp())
    model = None
    if args.model == "tiny":
        engine = AsyncEngine.from_pretrained(str(tiny_checkpoint_dir()), device="cpu")
        model = BackendModelClient(LocalBackend(engine))
    stores = open_stores(f"sqlite:///{work / 'stores'}")
    width, height = args.screen
    with VirtualDisplay(width, height) as display:
        app = launch_app(display.env(), work / "app.json")
        if model is None:  # the tests' screen-reading script: realistic clicks and typing, no model time
            from tests.os_agent_helpers import ScreenReadingModel

            model = ScreenReadingModel(work / "app.json", (width, height), json_mode=args.format == "json")
        try:
            runs = []
            for r in range(args.runs):
                session = f"sess_bench{r}"
                await stores.sessions.create("bench", session_id=session)

                async def emit(type_, data):
                    return None

                ctx = AgentContext(task_id=f"task_bench{r}", owner="bench", session_id=session, options={},
                                   attempt=1, model=model, sessions=stores.sessions, blobs=stores.blobs, emit=emit,
                                   cancelled=lambda: False)
                loop = OSAgentLoop(ctx, X11Executor(display.display), OSAgentInput(
                    goal="Type 'Ada Lovelace' into the Name field and press Submit.", max_steps=args.steps,
                    max_consecutive_failures=args.steps, action_format=args.format, settle_s=args.settle,
                    max_output_tokens=args.max_tokens, screenshot_max_side=max(width, height),
                    policy={"blocked_text": []}))
                started = time.perf_counter()
                result = await loop.run()
                runs.append((result, time.perf_counter() - started))
        finally:
            stop_app(app)
    steps = [s for result, _ in runs for s in result["trajectory"]]
    # a "wait" action's execute phase is the wait itself: left out of the execute figures
    phases = {p: summarize([s["timings"][p] for s in steps if p in s["timings"]
                            and not (p == "execute" and (s["action"] or {}).get("kind") == "wait")])
              for p in ("screenshot", "encode", "model", "execute")}
    kinds: dict[str, int] = {}
    for s in steps:
        if s["status"] == "executed":
            kinds[s["action"]["kind"]] = kinds.get(s["action"]["kind"], 0) + 1
    totals = [sum(s["timings"].values()) for s in steps if (s["action"] or {}).get("kind") != "wait"]
    statuses: dict[str, int] = {}
    for s in steps:
        statuses[s["status"]] = statuses.get(s["status"], 0) + 1
    return {"mode": "cpu", "model": args.model, "screen": f"{width}x{height}", "format": args.format, "steps": len(steps),
            "statuses": statuses, "executed_kinds": kinds, "phases": phases, "step_total": summarize(totals),
            "settle_s_in_execute": args.settle, "wall_s": round(sum(t for _, t in runs), 2),
            "machine": platform.platform(), "cpus": __import__("os").cpu_count()}


def gpu_model_step(args: argparse.Namespace) -> dict:
    import torch
    from PIL import Image

    from agents.os_agent.history import PastStep, StepPrompt
    from agents.os_agent.synthetic_ui import _draw_screen
    from agents.os_agent.trajectory import StepRecord
    from bench.a3b import a3b_bundle
    from bench.engine_bench import run_until_done, sync
    from engine.runtime.engine import EngineOptions, LLMEngine
    from pipelines.context import TokenCounter

    import random

    workdir = Path(tempfile.mkdtemp())
    bundle = a3b_bundle(workdir, args.device, layers=args.layers)
    engine = LLMEngine(bundle, EngineOptions(max_num_seqs=8, max_num_batched_tokens=8192, cache_tokens=65536,
                                             block_size=16))
    counter = TokenCounter.from_bundle(bundle)
    prompt = StepPrompt(counter=counter, window=131072, max_tokens=args.max_tokens,
                        goal="Open the Settings dialog and turn on dark mode.", keep_screenshots=2)
    rng = random.Random(0)
    shots = [_draw_screen(rng, (1920, 1080), f"s{i}.png", i, 6, 3, 4)[0] for i in range(6)]
    reply = "## Thought:\nThe settings icon is top right.\n## Code:\n```python\npyautogui.click(x=0.9, y=0.05)\n```"

    def step(index: int, previous: Image.Image | None, current: Image.Image, max_tokens: int) -> dict:
        past = []
        if previous is not None:
            past = [PastStep(StepRecord(index=index - 1, status="executed", model_output=reply,
                                        action={"kind": "click", "x": 1728, "y": 54}), previous)]
        messages, info = prompt.build(past, current, title="Settings", index=index)
        sync()
        t0 = time.perf_counter()
        seq = engine.make_sequence({"messages": messages, "max_tokens": max_tokens, "ignore_eos": True})
        t_pre = time.perf_counter()
        engine.add(seq)
        run_until_done(engine)
        sync()
        took = time.perf_counter() - t0
        image_tokens = sum(s.length for s in seq.images)
        return {"prompt_tokens": len(seq.prompt_ids), "image_tokens": image_tokens, "screenshots": info["screenshots"],
                "new_tokens": max_tokens, "preprocess_ms": round((t_pre - t0) * 1000, 1),
                "total_ms": round(took * 1000, 1)}

    step(0, None, shots[0], args.max_tokens)  # warm-up: kernels, graphs, allocator; caches the system prompt
    out = {
        # each case uses screenshots the engine has not seen: no vision-cache hit for the current one
        "first_step_ttft": step(0, None, shots[1], 1),
        "first_step": step(0, None, shots[2], args.max_tokens),
        # step 2: the earlier screenshot (shots[2]) and the shared prefix are cached, the new one is not
        "next_step": step(1, shots[2], shots[3], args.max_tokens),
    }
    return {"mode": "gpu", "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
            "layers": args.layers or "all", "torch": torch.__version__,
            "screenshot": "1920x1080", **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-model-step", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--screen", type=int, nargs=2, default=[1280, 800])
    parser.add_argument("--model", choices=["tiny", "scripted"], default="tiny")
    parser.add_argument("--format", choices=["json", "pyautogui"], default="json")
    parser.add_argument("--settle", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=None, help="default: 160 (json), 48 (pyautogui)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, help="shrink the model (smoke runs only)")
    args = parser.parse_args()
    if args.max_tokens is None:
        args.max_tokens = 48 if args.gpu_model_step or args.format == "pyautogui" else 160
    out = gpu_model_step(args) if args.gpu_model_step else asyncio.run(cpu_steps(args))
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
