"""What Ray Serve costs us: the full app over HTTP vs a bare two-deployment Serve app vs the engine in-process.

Three paths, same run, same requests (one chat message, ``max_tokens`` new tokens, greedy, ``ignore_eos`` so every
request produces exactly ``max_tokens`` tokens), closed-loop load at each concurrency:

  inprocess  ``AsyncEngine`` on the tiny checkpoint, called from this process (no Ray hop, no HTTP)
  bare       a bare Serve app through HTTP: FastAPI ingress -> DeploymentHandle -> a deployment that returns a
             constant (no model) — the price of the proxy + ingress + one handle hop by itself
  ours       kimiray's app through HTTP: POST /v1/chat/completions -> Ingress -> ModelServer (AsyncEngine)

Our overhead is ``ours_p50 - inprocess_p50``; the target is overhead <= 2 x the bare Serve hop's p50, at each
concurrency. Both apps are deployed side by side (bare under ``/bare``) and Ray + Serve stay up for the whole run,
so every path sees the same background; the paths are interleaved over ``--rounds`` rounds (a shared 2-core
machine drifts) and each path's latencies are pooled over the rounds. Deployment options and engine settings
come from ``ray_config.yaml`` (the production config); the bare app's two deployments get the same options as ours.
The in-process engine uses as many torch threads as the ModelServer replica gets (``--threads``, passed to the
replica as OMP_NUM_THREADS). HTTP load comes from ``httpx.AsyncClient`` in this process.

Ray runs on loopback only (the env of ``tests/serve_harness.py``) under its own RAY_TMPDIR, and is stopped at the
end (``serve.shutdown()`` + ``ray.shutdown()``: only what this script started).

Usage: python bench/serve_bench.py --json out.json [--concurrency 1 8 32] [--requests 200] [--rounds 3]
       [--max-tokens 8] [--threads 1]
"""

# No ``from __future__ import annotations`` here: the bare app's classes are shipped to Serve replicas by value,
# and FastAPI must see real annotation objects there (string annotations would not resolve in the replica).
import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # Ray passes the driver's sys.path to its workers: they import serve_app from here

from fastapi import FastAPI, Request  # noqa: E402

from connectors.ports import free_port  # noqa: E402
from tests.serve_harness import SAFE_ENV  # noqa: E402

KEY = "sk-bench-kimiray"
PROMPT = "Describe in one sentence why a serving layer should add little latency."
CONSTANT = {  # what the bare app returns: about the size of a real chat completion
    "id": "chatcmpl-bare", "object": "chat.completion", "created": 0, "model": "kimi-vl",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 40}, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
}


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def summarize(latencies: list[float], errors: list[str], wall: float, requests: int) -> dict[str, Any]:
    return {
        "requests": requests, "ok": len(latencies), "errors": len(errors), "first_errors": sorted(set(errors))[:3],
        "wall_s": round(wall, 3), "rps": round(len(latencies) / wall, 2) if wall else 0.0,
        "p50_ms": round(1000 * percentile(latencies, 50), 2), "p99_ms": round(1000 * percentile(latencies, 99), 2),
        "mean_ms": round(1000 * sum(latencies) / max(1, len(latencies)), 2),
    }


async def closed_loop(call: Callable[[], Awaitable[bool]], concurrency: int,
                      total: int) -> tuple[list[float], list[str], float]:
    """``concurrency`` workers issue ``total`` calls back to back: (latencies of the good calls, errors, wall)."""
    latencies: list[float] = []
    errors: list[str] = []
    issued = itertools.count()

    async def worker() -> None:
        while next(issued) < total:
            started = time.perf_counter()
            try:
                ok = await call()
            except Exception as exc:  # noqa: BLE001 - counted and reported
                ok, detail = False, repr(exc)[:200]
            else:
                detail = "bad response"
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors.append(detail)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - started


async def run_rounds(paths: dict[str, Callable[[], Awaitable[bool]]], levels: list[int], rounds: int,
                     requests: int, warmup: int) -> dict[str, dict[int, dict[str, Any]]]:
    """Paths interleaved: round after round, each level, each path in turn (slow drift of a shared machine hits
    all paths alike). Per path and level, latencies are pooled over the rounds."""
    pooled = {name: {c: ([], [], 0.0, 0, []) for c in levels} for name in paths}
    for r in range(rounds):
        for c in levels:
            total = max(requests, 20 * c)
            for name, call in paths.items():
                await closed_loop(call, c, max(warmup, 2 * c))  # warm caches, connections, batch shapes
                latencies, errors, wall = await closed_loop(call, c, total)
                lat, err, wall_sum, n, per_round = pooled[name][c]
                lat += latencies
                err += errors
                one = summarize(latencies, errors, wall, total)
                per_round.append(one)
                pooled[name][c] = (lat, err, wall_sum + wall, n + total, per_round)
                print(f"  round {r + 1}  {name:9s} c={c:<3d} {one['rps']:8.1f} req/s  p50 {one['p50_ms']:8.2f} ms  "
                      f"p99 {one['p99_ms']:8.2f} ms  ({one['ok']}/{total} ok)", flush=True)
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for name, by_c in pooled.items():
        out[name] = {}
        for c, (lat, err, wall, n, per_round) in by_c.items():
            out[name][c] = {"concurrency": c, **summarize(lat, err, wall, n),
                            "p50_ms_per_round": [x["p50_ms"] for x in per_round]}
    return out


# ---------------------------------------------------------------------------------------------------------------
# the three paths
# ---------------------------------------------------------------------------------------------------------------
def production_settings() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """App args and per-deployment options from ray_config.yaml, with limits opened up for load generation."""
    import yaml

    config = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    app = next(a for a in config["applications"] if a["name"] == "kimiray")
    args = app["args"]
    args["auth"] = {**args.get("auth", {}), "requests_per_minute": 10_000_000, "max_concurrent_per_key": 1024}
    options = {d.pop("name"): d for d in app["deployments"]}
    return args, options


def engine_options(args: dict[str, Any]) -> dict[str, Any]:
    from serve_app.config import AppConfig

    return AppConfig.model_validate(args).model.engine


def inprocess_call(engine: Any, max_tokens: int) -> Callable[[], Awaitable[bool]]:
    from engine.runtime.request import GenerateRequest

    async def call() -> bool:
        request = GenerateRequest(messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens,
                                  temperature=0.0, ignore_eos=True)
        last = None
        async for delta in engine.generate(request):
            last = delta
        return last is not None and last.finish_reason == "length" and last.usage.completion_tokens == max_tokens

    return call


def http_call(client: Any, url: str, max_tokens: int, check_tokens: bool) -> Callable[[], Awaitable[bool]]:
    body = {"model": "kimi-vl", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}

    async def call() -> bool:
        response = await client.post(url, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:120]}")
        data = response.json()
        return not check_tokens or data["usage"]["completion_tokens"] == max_tokens

    return call


def bare_app(options: dict[str, dict[str, Any]]):
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Constant")
    class Constant:
        async def reply(self, body: dict[str, Any]) -> dict[str, Any]:
            return CONSTANT

    @serve.deployment(name="BareIngress")
    @serve.ingress(api)
    class BareIngress:
        def __init__(self, backend: Any) -> None:
            self.backend = backend

        @api.post("/v1/chat/completions")
        async def chat(self, request: Request) -> dict[str, Any]:
            return await self.backend.reply.remote(await request.json())

    return BareIngress.options(**options["Ingress"]).bind(Constant.options(**options["ModelServer"]).bind())


def our_app(args: dict[str, Any], options: dict[str, dict[str, Any]]):
    from serve_app.app import Ingress, ModelServer
    from serve_app.config import AppConfig

    config = AppConfig.model_validate(args).model_dump()
    model = ModelServer.options(**options["ModelServer"]).bind(config)
    return Ingress.options(**options["Ingress"]).bind(model, config)


async def run_all(engine: Any, bare_url: str, ours_url: str, levels: list[int], rounds: int, requests: int,
                  warmup: int, max_tokens: int) -> dict[str, dict[int, dict[str, Any]]]:
    import httpx

    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    async with httpx.AsyncClient(limits=limits, timeout=300, trust_env=False,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        paths = {
            "ours": http_call(client, ours_url, max_tokens, check_tokens=True),
            "bare": http_call(client, bare_url, max_tokens, check_tokens=False),
            "inprocess": inprocess_call(engine, max_tokens),
        }
        try:
            return await run_rounds(paths, levels, rounds, requests, warmup)
        finally:
            await engine.shutdown(drain=True)


# ---------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=200, help="measured requests per level and round (>= 20 x c)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; latencies are pooled")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the engine (both paths)")
    parser.add_argument("--target-ratio", type=float, default=2.0)
    args_ns = parser.parse_args()
    levels = sorted(set(args_ns.concurrency))

    ray_tmp = tempfile.mkdtemp(prefix="kr-bench-", dir="/tmp")
    home = Path(tempfile.mkdtemp(prefix="kimiray-bench-home-"))
    env = {**SAFE_ENV, "KIMIRAY_HOME": str(home), "KIMIRAY_API_KEYS": KEY, "RAY_TMPDIR": ray_tmp,
           "OMP_NUM_THREADS": str(args_ns.threads)}
    os.environ.update(env)  # before ray is imported: it reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    import torch
    from ray import serve

    from engine.runtime.engine import AsyncEngine
    from connectors.paths import tiny_checkpoint_dir

    checkpoint = tiny_checkpoint_dir()
    app_args, options = production_settings()
    started = time.time()
    try:
        # log_to_driver=False: Serve's per-request access logs still go to the log files, as in production, but
        # are not streamed into this process, which is also the load generator.
        ray.init(include_dashboard=False, num_cpus=4, _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {k: env[k] for k in (*SAFE_ENV, "KIMIRAY_HOME", "KIMIRAY_API_KEYS",
                                                               "OMP_NUM_THREADS")}})
        try:
            port = free_port()
            serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            serve.run(bare_app(options), name="bare", route_prefix="/bare")
            serve.run(our_app(app_args, options), name="kimiray", route_prefix="/")
            torch.set_num_threads(args_ns.threads)  # the replica's engine runs with OMP_NUM_THREADS threads
            engine = AsyncEngine.from_pretrained(str(checkpoint), device="cpu", **engine_options(app_args))
            base = f"http://127.0.0.1:{port}"
            print(f"{args_ns.rounds} rounds x concurrency {levels}: ours (HTTP), bare Serve (HTTP), in-process",
                  flush=True)
            results = asyncio.run(run_all(engine, f"{base}/bare/v1/chat/completions", f"{base}/v1/chat/completions",
                                          levels, args_ns.rounds, args_ns.requests, args_ns.warmup,
                                          args_ns.max_tokens))
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)

    summary = []
    for c in levels:
        ours, inproc, bare = results["ours"][c], results["inprocess"][c], results["bare"][c]
        overhead = ours["p50_ms"] - inproc["p50_ms"]
        ratio = overhead / bare["p50_ms"]
        per_round = [round((o - i) / b, 2) for o, i, b in zip(ours["p50_ms_per_round"], inproc["p50_ms_per_round"],
                                                               bare["p50_ms_per_round"])]
        summary.append({"concurrency": c, "ours_p50_ms": ours["p50_ms"], "inprocess_p50_ms": inproc["p50_ms"],
                        "overhead_p50_ms": round(overhead, 2), "bare_hop_p50_ms": bare["p50_ms"],
                        "ratio": round(ratio, 2), "ratio_per_round": per_round,
                        "target_met": ratio <= args_ns.target_ratio})

    report = {
        "command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)
                                              if Path(sys.argv[0]).is_absolute() else sys.argv[0]), *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__, "torch": torch.__version__},
        "settings": {"concurrency": levels, "requests": args_ns.requests, "rounds": args_ns.rounds,
                     "warmup": args_ns.warmup,
                     "max_tokens": args_ns.max_tokens, "threads": args_ns.threads, "prompt": PROMPT,
                     "engine": engine_options(app_args), "deployments": options,
                     "target_ratio": args_ns.target_ratio},
        "results": {path: {str(c): r for c, r in by_c.items()} for path, by_c in results.items()},
        "summary": summary,
        "target_met": all(s["target_met"] for s in summary),
        "duration_s": round(time.time() - started, 1),
    }
    args_ns.json.parent.mkdir(parents=True, exist_ok=True)
    args_ns.json.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print("| concurrency | path | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        for path in ("ours", "bare", "inprocess"):
            r = results[path][c]
            print(f"| {c} | {path} | {r['rps']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    print()
    print("| concurrency | ours p50 − in-process p50 (ms) | bare Serve hop p50 (ms) | ratio | ratio per round | "
          f"target ≤ {args_ns.target_ratio:g} |")
    print("|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['concurrency']} | {s['ours_p50_ms']:.2f} − {s['inprocess_p50_ms']:.2f} = "
              f"{s['overhead_p50_ms']:.2f} | {s['bare_hop_p50_ms']:.2f} | {s['ratio']:.2f} | "
              f"{', '.join(f'{x:.2f}' for x in s['ratio_per_round'])} | {'met' if s['target_met'] else 'not met'} |")
    print(f"\nwrote {args_ns.json}")


if __name__ == "__main__":
    main()
