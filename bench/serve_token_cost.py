"""What one streamed token costs the Serve path, in CPU time and in latency, without a GPU.

The real app (HTTP proxy -> Ingress -> ModelServer) on a local Ray, with the model simulated at the H100's
measured step times (``sim:h100``, connectors/sim_engine.py: tokens arrive exactly as fast as on the GPU, no
model compute on the CPU). Streaming requests at each concurrency (closed loop, SSE read with httpx); reported:

* ``cpu_ms_per_token``: CPU seconds (user + system) the proxy, Ingress and ModelServer processes of this run's own
  Ray spent, per streamed token (client excluded), and per process;
* ``tpot_ms`` / ``ttft_ms`` (p50) against the simulated engine's step time (what the engine alone would give).

``--code DIR`` runs another checkout's serve_app/connectors (e.g. ``git archive <commit> | tar -x -C DIR``) with
this script, for a before/after comparison in one session.

Usage: python bench/serve_token_cost.py [--concurrency 1 16 64] [--max-tokens 200] [--requests 4] [--code DIR]
       [--fast-path] [--ingress-replicas N] [--serve-env KEY=VALUE ...] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2, help="rounds of requests per stream slot")
    parser.add_argument("--code", default=str(HERE), help="the checkout whose serve_app/connectors run")
    parser.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for every Ray process of the run (Serve's knobs)")
    parser.add_argument("--fast-path", action="store_true",
                        help="Serve's fast path as `kimiray serve` sets it (serve_app.fast_path: HAProxy + "
                        "RAY_SERVE_THROUGHPUT_OPTIMIZED)")
    parser.add_argument("--ingress-replicas", type=int, help="Ingress replicas (ray_config.yaml's count if unset)")
    parser.add_argument("--json")
    return parser.parse_args()


def _our_processes() -> dict[str, Any]:
    """{role: psutil.Process} of this run's Ray: the serve proxy and the two replicas (children of our raylet)."""
    import psutil
    import ray

    node = ray._private.worker._global_node
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    roles = {"proxy": "ProxyActor", "haproxy_manager": "HAProxyManager", "ingress": "ServeReplica:kimiray:Ingress",
             "model_server": "ServeReplica:kimiray:ModelServer"}
    found: dict[str, Any] = {}
    for proc in raylet.children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if proc.name() == "haproxy" or title.split(" ", 1)[0].endswith("/haproxy"):
            found.setdefault("haproxy", []).append(proc)  # the HAProxy ingress's workers (RAY_SERVE_ENABLE_HA_PROXY)
            continue
        for role, marker in roles.items():
            if marker in title:
                found.setdefault(role, []).append(proc)  # a list: an Ingress with several replicas
    return found


def _cpu(procs: dict[str, Any]) -> dict[str, dict[int, float]]:
    """{role: {pid: CPU seconds}}; a process gone meanwhile (HAProxy replaces its workers on reload) is left out."""
    import psutil

    out: dict[str, dict[int, float]] = {}
    for role, group in procs.items():
        for proc in group:
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            out.setdefault(role, {})[proc.pid] = t.user + t.system
    return out


def _cpu_spent(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds per role between two readings, over the processes alive at both."""
    return {role: sum(after[role][pid] - seconds for pid, seconds in before.get(role, {}).items()
                      if pid in after[role]) for role in after}


async def _stream(client: Any, url: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": "kimi-vl", "messages": [{"role": "user", "content": "Tell me about serving."}],
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.status_code
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
                continue
            first = first or now
            last = now
    return {"ttft": first - started, "tpot": (last - first) / max(1, tokens - 1), "tokens": tokens}


async def _level(url: str, concurrency: int, rounds: int, max_tokens: int) -> tuple[list[dict[str, Any]], float]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits, trust_env=False) as client:
        await asyncio.gather(*(_stream(client, url, 4) for _ in range(concurrency)))  # connections, warm paths
        started = time.perf_counter()
        results: list[dict[str, Any]] = []

        async def worker() -> None:
            for _ in range(rounds):
                results.append(await _stream(client, url, max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - started


def main() -> None:
    args = parse_args()
    code = str(Path(args.code).resolve())
    sys.path.insert(0, code)
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost", "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "RAY_DEDUP_LOGS": "0", **dict(kv.split("=", 1) for kv in args.serve_env)}
    if args.fast_path:
        sys.path.insert(0, str(HERE))
        from serve_app.fast_path import fast_path_env

        env.update(fast_path_env({**os.environ, **env}))
    os.environ.update(env)
    os.environ.pop("KIMIRAY_API_KEYS", None)
    import ray
    import yaml
    from ray import serve

    sys.path.insert(0, str(HERE))
    from bench.serve_gpu_bench import free_port
    from connectors.sim_engine import PROFILES
    from serve_app.app import Ingress, ModelServer
    from serve_app.config import AppConfig

    config = yaml.safe_load((HERE / "ray_config.yaml").read_text())
    app_cfg = next(a for a in config["applications"] if a["name"] == "kimiray")
    options = {d.pop("name"): d for d in app_cfg["deployments"]}
    if args.ingress_replicas:
        options["Ingress"]["num_replicas"] = args.ingress_replicas
    app_args = app_cfg["args"]
    app_args["model"]["model"] = "sim:h100"
    app_args["auth"] = {**app_args["auth"], "requests_per_minute": 10_000_000, "max_concurrent_per_key": 1024}
    results: dict[str, Any] = {"code": code, "serve_env": args.serve_env, "fast_path": args.fast_path,
                               "levels": {}}
    with tempfile.TemporaryDirectory() as home:
        port = free_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(free_port())
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", num_cpus=4, log_to_driver=False,
                 runtime_env={"env_vars": {**env, "KIMIRAY_HOME": home, "PYTHONPATH": code}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            cfg = AppConfig.model_validate(app_args).model_dump()
            model = ModelServer.options(**options["ModelServer"]).bind(cfg)
            serve.run(Ingress.options(**options["Ingress"]).bind(model, cfg, None), name="kimiray", route_prefix="/")
            url = f"http://127.0.0.1:{port}"
            for c in args.concurrency:
                procs = _our_processes()
                assert {"ingress", "model_server"} <= set(procs), procs
                before = _cpu(procs)
                streams, wall = asyncio.run(_level(url, c, args.requests, args.max_tokens))
                spent = _cpu_spent(before, _cpu(procs))
                tokens = sum(s["tokens"] for s in streams)
                per = {role: round(1000 * seconds / tokens, 4) for role, seconds in spent.items()}
                level = {
                    "streams": len(streams), "tokens": tokens, "wall_s": round(wall, 2),
                    "cpu_ms_per_token": round(sum(per.values()), 4), "cpu_ms_per_token_by_process": per,
                    "ttft_ms_p50": round(1000 * statistics.median(s["ttft"] for s in streams), 2),
                    "tpot_ms_p50": round(1000 * statistics.median(s["tpot"] for s in streams), 3),
                    "engine_step_ms": round(PROFILES["h100"].decode_ms(c), 3),
                }
                results["levels"][c] = level
                print(f"[token_cost] c={c}: {level}", flush=True)
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
